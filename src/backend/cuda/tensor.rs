//! A tensor of the CUDA backend: one device allocation, its logical shape and storage type.
//!
//! Layout: 4-D tensors are stored NHWC (a logical N x C x H x W tensor; conv weights O x I x kh x kw
//! are thus stored [O][kh][kw][I], as the convolution kernels read them); other ranks row-major.
//! The transposes happen on the host at the edges (`upload`, `write`, `download`).
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use half::{bf16, f16};

use crate::backend::{Precision, TensorShape};
use crate::driver::{DevicePtr, Driver};

pub struct CudaTensor {
    pub(crate) ptr: DevicePtr,
    pub(crate) shape: Vec<usize>,
    pub(crate) dtype: Precision,
    pub(crate) driver: Arc<dyn Driver>,
    /// The backend's count of device bytes, given back on drop.
    pub(crate) memory: Arc<DeviceMemory>,
    /// Bytes of the allocation (at least 4: never a zero-byte allocation).
    pub(crate) allocated: usize,
}

/// Device bytes a CUDA backend holds in tensors now, and the most it has held at once: every
/// allocation of the backend goes through it, so this is the backend's whole footprint (not
/// counting the kernels' code and the driver's own context).
#[derive(Debug, Default)]
pub struct DeviceMemory {
    in_use: AtomicUsize,
    peak: AtomicUsize,
}

impl DeviceMemory {
    pub fn in_use(&self) -> usize {
        self.in_use.load(Ordering::Relaxed)
    }
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }
    /// Starts a new peak from what is held now.
    pub fn reset_peak(&self) {
        self.peak.store(self.in_use(), Ordering::Relaxed);
    }
    pub(crate) fn allocated(&self, bytes: usize) {
        let now = self.in_use.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }
    fn freed(&self, bytes: usize) {
        self.in_use.fetch_sub(bytes, Ordering::Relaxed);
    }
}

impl CudaTensor {
    /// The device address of the first element.
    pub fn device_ptr(&self) -> DevicePtr {
        self.ptr
    }
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn bytes(&self) -> usize {
        self.len() * self.dtype.bytes()
    }
    /// Whether the storage is NHWC (4-D) rather than the logical row-major order.
    pub fn is_nhwc(&self) -> bool {
        self.shape.len() == 4
    }
}

impl TensorShape for CudaTensor {
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn dtype(&self) -> Precision {
        self.dtype
    }
}

impl Drop for CudaTensor {
    fn drop(&mut self) {
        // A failed free leaks device memory but cannot be reported from a destructor; the
        // driver's next call reports a broken device anyway.
        let _ = self.driver.free(self.ptr);
        self.memory.freed(self.allocated);
    }
}

/// Logical row-major values (NCHW for 4-D) in the storage order of a tensor of `shape`.
pub fn to_storage_order(data: &[f32], shape: &[usize]) -> Vec<f32> {
    let &[n, c, h, w] = shape else { return data.to_vec() };
    let mut out = vec![0.0; data.len()];
    for s in 0..n {
        for ch in 0..c {
            for y in 0..h {
                for x in 0..w {
                    out[((s * h + y) * w + x) * c + ch] = data[((s * c + ch) * h + y) * w + x];
                }
            }
        }
    }
    out
}

/// The inverse of `to_storage_order`.
pub fn from_storage_order(data: &[f32], shape: &[usize]) -> Vec<f32> {
    let &[n, c, h, w] = shape else { return data.to_vec() };
    let mut out = vec![0.0; data.len()];
    for s in 0..n {
        for ch in 0..c {
            for y in 0..h {
                for x in 0..w {
                    out[((s * c + ch) * h + y) * w + x] = data[((s * h + y) * w + x) * c + ch];
                }
            }
        }
    }
    out
}

/// f32 values as the bytes of storage type `dtype` (rounded to nearest even).
pub fn encode(values: &[f32], dtype: Precision) -> Vec<u8> {
    match dtype {
        Precision::F32 => bytemuck::cast_slice(values).to_vec(),
        Precision::F16 => values.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()).collect(),
        Precision::Bf16 => values.iter().flat_map(|&v| bf16::from_f32(v).to_le_bytes()).collect(),
    }
}

/// Bytes of storage type `dtype` as f32 values.
pub fn decode(bytes: &[u8], dtype: Precision) -> Vec<f32> {
    match dtype {
        Precision::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        Precision::F16 => bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        Precision::Bf16 => bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_order_round_trip() {
        let shape = [2, 3, 4, 5];
        let data: Vec<f32> = (0..120).map(|i| i as f32).collect();
        let stored = to_storage_order(&data, &shape);
        // Element (n=1, c=2, y=3, x=4) sits at ((1*4 + 3)*5 + 4)*3 + 2 in NHWC.
        assert_eq!(stored[((4 + 3) * 5 + 4) * 3 + 2], data[((3 + 2) * 4 + 3) * 5 + 4]);
        assert_eq!(from_storage_order(&stored, &shape), data);
        assert_eq!(to_storage_order(&data[..6], &[2, 3]), data[..6].to_vec());
    }

    #[test]
    fn encode_decode() {
        let v = [1.0f32, -2.5, 1.0 + 1.0 / 512.0];
        assert_eq!(decode(&encode(&v, Precision::F32), Precision::F32), v);
        assert_eq!(decode(&encode(&v, Precision::Bf16), Precision::Bf16), [1.0, -2.5, 1.0]);
        assert_eq!(decode(&encode(&v, Precision::F16), Precision::F16), v);
    }
}
