//! All-or-nothing outputs. A command declares every output (folders, report files) before it
//! computes anything: each is checked against the inputs and made writable at once (the folder
//! created, an empty staging file created beside each report), so a bad path fails in a second,
//! not after the compute. The command then writes into the staging places; `commit` moves
//! everything into place at the end. Dropped without a commit (an error on the way), the staging
//! places and the folders made for them are removed, and what was there before is left as it was.
//!
//! A run killed outright (SIGKILL, power loss) may leave a hidden `.purifier-staging-*` folder or
//! `.*.staged` file behind; never a half-written output under its real name.
use std::path::{Component, Path, PathBuf};

use purifier::error::{Error, Result};

/// A folder of outputs, written through its staging folder.
pub struct StagedFolder {
    /// Where the outputs end up.
    pub target: PathBuf,
    /// Where they are written until the commit (a hidden folder inside `target`).
    pub staging: PathBuf,
}

impl StagedFolder {
    /// Where to write the output that will be `target/name`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.staging.join(name)
    }
}

/// One output file, written to `staging` until the commit.
pub struct StagedFile {
    pub target: PathBuf,
    pub staging: PathBuf,
}

/// Every output of one command, staged.
pub struct Outputs {
    /// The inputs (images, weights), resolved: no output may overwrite or contain one.
    inputs: Vec<(PathBuf, PathBuf)>,
    folders: Vec<StagedFolder>,
    files: Vec<StagedFile>,
    /// Folders created for the outputs, outermost first: removed on failure if still empty.
    created: Vec<PathBuf>,
    committed: bool,
}

impl Outputs {
    /// Outputs of a command that reads `inputs` (files or folders).
    pub fn new<'a>(inputs: impl IntoIterator<Item = &'a Path>) -> Self {
        let inputs = inputs.into_iter().map(|p| (p.to_path_buf(), resolve(p))).collect();
        Outputs { inputs, folders: Vec::new(), files: Vec::new(), created: Vec::new(), committed: false }
    }

    /// Declares the output folder `dir`: refused if it is an input or holds one; created (with
    /// its parents) and given a staging folder now, so that it is known to be writable.
    pub fn folder(&mut self, dir: &Path, flag: &str) -> Result<usize> {
        let resolved = resolve(dir);
        for (input, input_resolved) in &self.inputs {
            if input_resolved.starts_with(&resolved) {
                let what = if *input_resolved == resolved { "is" } else { "contains" };
                return Err(Error::invalid(format!(
                    "{flag} {} {what} the input {}: writing there would overwrite or mix with the inputs; \
                     choose another folder",
                    dir.display(),
                    input.display()
                )));
            }
        }
        if dir.exists() && !dir.is_dir() {
            return Err(Error::invalid(format!("{flag} {} exists and is not a folder", dir.display())));
        }
        self.create_dirs(dir)?;
        let staging = dir.join(format!(".purifier-staging-{}", std::process::id()));
        std::fs::create_dir(&staging).map_err(|e| Error::Write { path: staging.clone(), source: e })?;
        self.folders.push(StagedFolder { target: dir.to_path_buf(), staging });
        Ok(self.folders.len() - 1)
    }

    /// Declares the output file `path`: refused if it is an input or a folder; its folder is
    /// created and an empty staging file made beside it now.
    pub fn file(&mut self, path: &Path, flag: &str) -> Result<usize> {
        let resolved = resolve(path);
        // The input itself, or a PNG the image loader would read from an input folder.
        let is_png = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("png"));
        let read_as_input = |r: &PathBuf| *r == resolved || (is_png && resolved.parent() == Some(r.as_path()));
        if let Some((input, _)) = self.inputs.iter().find(|(_, r)| read_as_input(r)) {
            return Err(Error::invalid(format!(
                "{flag} {} is the input {} (or one of its images): choose another file",
                path.display(),
                input.display()
            )));
        }
        if path.is_dir() {
            return Err(Error::invalid(format!("{flag} {} is a folder; give a file name", path.display())));
        }
        let name =
            path.file_name().ok_or_else(|| Error::invalid(format!("{flag} {} has no file name", path.display())))?;
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        self.create_dirs(&parent)?;
        let staging = parent.join(format!(".{}.{}.staged", name.to_string_lossy(), std::process::id()));
        std::fs::File::create(&staging).map_err(|e| Error::Write { path: path.to_path_buf(), source: e })?;
        self.files.push(StagedFile { target: path.to_path_buf(), staging });
        Ok(self.files.len() - 1)
    }

    pub fn staged_folder(&self, index: usize) -> &StagedFolder {
        &self.folders[index]
    }

    /// Where to write the output file declared as `index`.
    pub fn staged_file(&self, index: usize) -> &Path {
        &self.files[index].staging
    }

    /// Moves every staged output into place (folders first, then files such as reports).
    pub fn commit(mut self) -> Result<()> {
        for folder in &self.folders {
            let entries = std::fs::read_dir(&folder.staging).map_err(|e| Error::io(&folder.staging, e))?;
            for entry in entries {
                let entry = entry.map_err(|e| Error::io(&folder.staging, e))?;
                let target = folder.target.join(entry.file_name());
                std::fs::rename(entry.path(), &target).map_err(|e| Error::Write { path: target, source: e })?;
            }
            std::fs::remove_dir(&folder.staging)
                .map_err(|e| Error::Write { path: folder.staging.clone(), source: e })?;
        }
        for file in &self.files {
            std::fs::rename(&file.staging, &file.target)
                .map_err(|e| Error::Write { path: file.target.clone(), source: e })?;
        }
        self.committed = true;
        Ok(())
    }

    /// Creates `dir` and its missing parents, remembering which were made.
    fn create_dirs(&mut self, dir: &Path) -> Result<()> {
        let mut missing = Vec::new();
        let mut at = Some(dir);
        while let Some(p) = at {
            if p.as_os_str().is_empty() || p.exists() {
                break;
            }
            missing.push(p.to_path_buf());
            at = p.parent();
        }
        for p in missing.into_iter().rev() {
            std::fs::create_dir(&p).map_err(|e| Error::Write { path: p.clone(), source: e })?;
            self.created.push(p);
        }
        Ok(())
    }
}

impl Drop for Outputs {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        for folder in &self.folders {
            let _ = std::fs::remove_dir_all(&folder.staging);
        }
        for file in &self.files {
            let _ = std::fs::remove_file(&file.staging);
        }
        for dir in self.created.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// `path` made absolute, with symbolic links and `..` resolved as far as it exists.
fn resolve(path: &Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    // Canonicalise the longest existing prefix; append the rest, dropping `.` and folding `..`.
    let mut existing = absolute.as_path();
    let mut rest = Vec::new();
    while !existing.exists() {
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                existing = parent;
            }
            _ => break,
        }
    }
    let mut resolved = existing.canonicalize().unwrap_or_else(|_| existing.to_path_buf());
    for name in rest.into_iter().rev() {
        match Path::new(&name).components().next() {
            Some(Component::ParentDir) => {
                resolved.pop();
            }
            Some(Component::CurDir) => {}
            _ => resolved.push(name),
        }
    }
    resolved
}
