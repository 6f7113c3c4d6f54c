//! Output files on the broker's disk.
//!
//! Uploads land in `<state>/artifacts/.staging/<job>-<attempt>-<index>`, hashed as
//! they arrive. When the worker reports success the store checks each file's size
//! and sha256 against the worker's report, fsyncs it and moves it to
//! `<state>/artifacts/<job>/<index>-<name>`. Names were checked by the core to be
//! plain file names, and are checked again here, so nothing escapes the directory.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use kiln_protocol::client::hex;
use kiln_protocol::job::safe_file_name;
use kiln_protocol::worker::OutputMeta;
use kiln_protocol::{ArtifactId, ArtifactMeta, JobId};
use sha2::{Digest, Sha256};

struct Staging {
    file: File,
    path: PathBuf,
    hasher: Sha256,
    written: u64,
}

pub struct ArtifactStore {
    root: PathBuf,
    staging: HashMap<(JobId, u32, u16), Staging>,
}

impl ArtifactStore {
    /// Opens `<state_dir>/artifacts`, clearing uploads left half-done by a crash
    /// (their workers send them again).
    pub fn open(state_dir: &Path) -> std::io::Result<ArtifactStore> {
        let root = state_dir.join("artifacts");
        let staging = root.join(".staging");
        if staging.exists() {
            fs::remove_dir_all(&staging)?;
        }
        fs::create_dir_all(&staging)?;
        Ok(ArtifactStore {
            root,
            staging: HashMap::new(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn final_path(&self, id: ArtifactId, name: &str) -> Option<PathBuf> {
        let name = safe_file_name(name)?;
        Some(
            self.root
                .join(id.job.to_string())
                .join(format!("{}-{name}", id.index)),
        )
    }

    /// Appends one uploaded piece; a piece at offset 0 starts the file over.
    pub fn write(
        &mut self,
        job: JobId,
        attempt: u32,
        index: u16,
        offset: u64,
        data: &[u8],
    ) -> Result<(), String> {
        let key = (job, attempt, index);
        if offset == 0 {
            let path = self
                .root
                .join(".staging")
                .join(format!("{job}-{attempt}-{index}"));
            let file = OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .open(&path)
                .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
            self.staging.insert(
                key,
                Staging {
                    file,
                    path,
                    hasher: Sha256::new(),
                    written: 0,
                },
            );
        }
        let s = self
            .staging
            .get_mut(&key)
            .ok_or_else(|| format!("upload of {job} output {index} did not start at offset 0"))?;
        if s.written != offset {
            return Err(format!(
                "upload of {job} output {index} expected offset {}, got {offset}",
                s.written
            ));
        }
        s.file
            .write_all(data)
            .map_err(|e| format!("cannot write {}: {e}", s.path.display()))?;
        s.hasher.update(data);
        s.written += data.len() as u64;
        Ok(())
    }

    /// Verifies and installs an attempt's outputs.
    pub fn finalize(
        &mut self,
        job: JobId,
        attempt: u32,
        outputs: &[OutputMeta],
    ) -> Result<Vec<ArtifactMeta>, String> {
        let mut metas = Vec::with_capacity(outputs.len());
        let mut moves = Vec::with_capacity(outputs.len());
        for o in outputs {
            let s = self
                .staging
                .get(&(job, attempt, o.index))
                .ok_or_else(|| format!("output {} ({}) was never uploaded", o.index, o.name))?;
            if s.written != o.size {
                return Err(format!(
                    "output {} has {} bytes, the worker reported {}",
                    o.index, s.written, o.size
                ));
            }
            let id = ArtifactId {
                job,
                index: o.index,
            };
            let dest = self
                .final_path(id, &o.name)
                .ok_or_else(|| format!("output name {:?} is not a plain file name", o.name))?;
            moves.push((o.index, dest));
        }
        for (o, (index, dest)) in outputs.iter().zip(moves) {
            let s = self
                .staging
                .remove(&(job, attempt, index))
                .expect("checked above");
            let sha = hex(&s.hasher.finalize());
            if !sha.eq_ignore_ascii_case(&o.sha256) {
                let _ = fs::remove_file(&s.path);
                return Err(format!(
                    "output {index} has sha256 {sha}, the worker reported {}",
                    o.sha256
                ));
            }
            s.file
                .sync_all()
                .map_err(|e| format!("fsync {}: {e}", s.path.display()))?;
            let dir = dest.parent().expect("has a job directory");
            fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            fs::rename(&s.path, &dest)
                .map_err(|e| format!("cannot move into {}: {e}", dest.display()))?;
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
            metas.push(ArtifactMeta {
                id: ArtifactId { job, index },
                name: o.name.clone(),
                media_type: o.media_type.clone(),
                size: o.size,
                sha256: sha,
            });
        }
        self.discard(job, attempt);
        Ok(metas)
    }

    /// Forgets an attempt's staged uploads.
    pub fn discard(&mut self, job: JobId, attempt: u32) {
        let keys: Vec<_> = self
            .staging
            .keys()
            .filter(|(j, a, _)| *j == job && *a == attempt)
            .copied()
            .collect();
        for k in keys {
            if let Some(s) = self.staging.remove(&k) {
                let _ = fs::remove_file(&s.path);
            }
        }
    }

    /// Reads `len` bytes at `offset` of a stored artifact.
    pub fn read(&self, meta: &ArtifactMeta, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
        let path = self
            .final_path(meta.id, &meta.name)
            .ok_or_else(|| std::io::Error::other("unsafe artifact name"))?;
        let mut f = File::open(path)?;
        f.seek(SeekFrom::Start(offset))?;
        let mut buf = vec![0; len as usize];
        f.read_exact(&mut buf)?;
        Ok(buf)
    }

    /// Removes every file of a job.
    pub fn delete(&mut self, job: JobId) {
        let dir = self.root.join(job.to_string());
        if let Err(e) = fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(job = %job, error = %e, "cannot remove artifacts");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(name: &str, data: &[u8]) -> OutputMeta {
        OutputMeta {
            index: 0,
            name: name.into(),
            media_type: "image/png".into(),
            size: data.len() as u64,
            sha256: hex(&Sha256::digest(data)),
        }
    }

    #[test]
    fn upload_finalize_read_delete() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = ArtifactStore::open(dir.path()).unwrap();
        let job = JobId(3);
        store.write(job, 1, 0, 0, b"hello ").unwrap();
        store.write(job, 1, 0, 6, b"world").unwrap();
        assert!(store.write(job, 1, 0, 3, b"x").is_err(), "out of order");
        let metas = store
            .finalize(job, 1, &[meta("out.png", b"hello world")])
            .unwrap();
        assert_eq!(metas[0].id.to_string(), "j3.0");
        assert_eq!(store.read(&metas[0], 6, 5).unwrap(), b"world");
        assert!(dir.path().join("artifacts/j3/0-out.png").is_file());
        store.delete(job);
        assert!(!dir.path().join("artifacts/j3").exists());
    }

    #[test]
    fn a_wrong_hash_or_size_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = ArtifactStore::open(dir.path()).unwrap();
        store.write(JobId(1), 1, 0, 0, b"abc").unwrap();
        let mut m = meta("a.png", b"abd");
        assert!(store
            .finalize(JobId(1), 1, &[m.clone()])
            .unwrap_err()
            .contains("sha256"));
        store.write(JobId(1), 2, 0, 0, b"abc").unwrap();
        m.size = 4;
        assert!(store
            .finalize(JobId(1), 2, &[m])
            .unwrap_err()
            .contains("bytes"));
        store.write(JobId(1), 3, 0, 0, b"abc").unwrap();
        let evil = meta("../../escape", b"abc");
        assert!(store.finalize(JobId(1), 3, &[evil]).is_err());
        assert!(!dir.path().join("escape").exists());
    }
}
