//! Arbitrary bytes through the cifar reader (see purifier::data::fuzz_entry).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| purifier::data::fuzz_entry::cifar_bytes(data));
