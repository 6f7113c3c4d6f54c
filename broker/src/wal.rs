//! The job store's write-ahead log: one appended frame and one fsync per group commit.
//!
//! A durable redb commit syncs several scattered pages, which costs two to three times
//! an append to one file and its sync (measured in `docs/performance.md`). So the
//! store appends each group here, syncs it, and then gives the same records to redb
//! in a commit that does not sync. A synced redb commit every few MiB (a checkpoint)
//! lets the log start again from empty.
//!
//! A frame is `[payload length: u32 LE][crc32 of payload: u32 LE][payload]`. Reading
//! stops at the first frame that is short or fails its checksum: that is an append
//! cut off by a crash, which was never acknowledged to anyone.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// Frame header: length and checksum.
const HEADER: usize = 8;

/// An append-only file of checksummed frames.
pub struct Wal {
    file: File,
    path: PathBuf,
    len: u64,
    /// One buffer for header and payload, so a frame is one `write`.
    frame: Vec<u8>,
    /// A failed append may have left part of a frame after `len`.
    dirty: bool,
}

/// What `open` found in the log.
pub struct Replay {
    /// Payloads of the complete frames, oldest first.
    pub frames: Vec<Vec<u8>>,
    /// Bytes after the last complete frame (a torn append), ignored.
    pub torn_bytes: u64,
}

impl Wal {
    /// Opens (or creates) the log and reads every complete frame in it.
    pub fn open(path: &Path) -> io::Result<(Wal, Replay)> {
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let mut frames = Vec::new();
        let mut at = 0usize;
        while let Some(header) = bytes.get(at..at + HEADER) {
            let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
            let crc = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
            let Some(payload) = bytes.get(at + HEADER..at + HEADER + len) else {
                break;
            };
            if crc32fast::hash(payload) != crc {
                break;
            }
            frames.push(payload.to_vec());
            at += HEADER + len;
        }
        let wal = Wal {
            file,
            path: path.to_path_buf(),
            len: bytes.len() as u64,
            frame: Vec::new(),
            dirty: false,
        };
        let replay = Replay {
            frames,
            torn_bytes: (bytes.len() - at) as u64,
        };
        Ok((wal, replay))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes in the log, torn tail included.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends one frame and waits until it is on disk.
    ///
    /// # Errors
    /// The I/O error of the write or the sync (`ENOSPC` on a full disk). The log is
    /// then cut back to its last whole frame, so a later append never lands behind
    /// a partial one (which replay would stop at, losing the later frame). If even
    /// the cut fails, every later append first retries it and fails until it works.
    pub fn append(&mut self, payload: &[u8]) -> io::Result<()> {
        let len = u32::try_from(payload.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "log frame over 4 GiB"))?;
        if self.dirty {
            self.cut_back()?;
        }
        self.frame.clear();
        self.frame.extend_from_slice(&len.to_le_bytes());
        self.frame
            .extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        self.frame.extend_from_slice(payload);
        let written = self
            .file
            .write_all(&self.frame)
            .and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            self.dirty = true;
            // Best effort now; retried before the next append if it fails.
            let _ = self.cut_back();
            return Err(e);
        }
        self.len += self.frame.len() as u64;
        Ok(())
    }

    /// Truncates the file to the frames counted in `len` and syncs that length.
    fn cut_back(&mut self) -> io::Result<()> {
        self.file.set_len(self.len)?;
        self.file.sync_all()?;
        self.dirty = false;
        Ok(())
    }

    /// Empties the log once everything in it is durable elsewhere. The new length
    /// is synced before any later append, so a crash cannot leave old frames
    /// behind new ones.
    pub fn reset(&mut self) -> io::Result<()> {
        self.file.set_len(0)?;
        self.file.sync_all()?;
        self.len = 0;
        self.dirty = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_come_back_in_order_and_a_torn_tail_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("test.wal");
        let (mut wal, replay) = Wal::open(&path).unwrap();
        assert!(replay.frames.is_empty());
        wal.append(b"first").unwrap();
        wal.append(b"").unwrap();
        wal.append(b"third").unwrap();
        let whole = wal.len();
        drop(wal);

        // A crash in the middle of the next append: its header and half its payload.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&100u32.to_le_bytes()).unwrap();
        f.write_all(&crc32fast::hash(&[0; 100]).to_le_bytes())
            .unwrap();
        f.write_all(&[0; 50]).unwrap();
        drop(f);

        let (wal, replay) = Wal::open(&path).unwrap();
        assert_eq!(replay.frames, [&b"first"[..], b"", b"third"]);
        assert_eq!(replay.torn_bytes, 58);
        assert_eq!(wal.len(), whole + 58);
    }

    #[test]
    fn a_frame_with_a_bad_checksum_ends_the_replay() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("test.wal");
        let (mut wal, _) = Wal::open(&path).unwrap();
        wal.append(b"good").unwrap();
        wal.append(b"flipped").unwrap();
        wal.append(b"after").unwrap();
        drop(wal);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[HEADER + 4 + HEADER] ^= 1; // first payload byte of the second frame
        std::fs::write(&path, &bytes).unwrap();
        let (_, replay) = Wal::open(&path).unwrap();
        assert_eq!(replay.frames, [&b"good"[..]]);
        assert_eq!(replay.torn_bytes, (bytes.len() - HEADER - 4) as u64);
    }

    #[test]
    fn reset_empties_the_log_for_new_frames() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("test.wal");
        let (mut wal, _) = Wal::open(&path).unwrap();
        wal.append(b"old").unwrap();
        wal.reset().unwrap();
        assert!(wal.is_empty());
        wal.append(b"new").unwrap();
        drop(wal);
        let (_, replay) = Wal::open(&path).unwrap();
        assert_eq!(replay.frames, [&b"new"[..]]);
    }
}
