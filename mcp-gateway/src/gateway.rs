//! The state every MCP session shares: one broker [`Client`] (which multiplexes
//! any number of concurrent calls over one connection), the configuration, the
//! allowed roots, and what the gateway remembers about the jobs it submitted.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use kiln_config::{KilnConfig, McpConfig};
use kiln_protocol::{Client, ClientOptions, JobId};
use rmcp::task_manager::TaskManager;

use crate::files::AllowedRoots;

/// What the gateway does to a job's images after the generator: for sprites with a
/// transparent background and pixel-art styles.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PostProcess {
    pub remove_background: bool,
    pub pixel_cell: Option<u32>,
}

impl PostProcess {
    /// Pixel-art styles snap to their grid; nothing else is touched.
    pub fn for_style(style: Option<crate::args::StylePreset>) -> PostProcess {
        PostProcess {
            remove_background: false,
            pixel_cell: style.and_then(|s| crate::spec::style_words(s).2),
        }
    }

    pub fn is_none(&self) -> bool {
        !self.remove_background && self.pixel_cell.is_none()
    }
}

/// How many jobs' post-processing is remembered (oldest forgotten first).
const REMEMBERED_JOBS: usize = 10_000;

/// Shared by all sessions of one `kiln-mcp` process.
pub struct Gateway {
    pub client: Client,
    pub cfg: McpConfig,
    pub roots: AllowedRoots,
    /// The name this gateway's jobs are filed under at the broker.
    pub client_name: Option<String>,
    /// Generate calls run as MCP tasks (SEP-2663) for clients that ask for them;
    /// shared so any session (or stateless HTTP request) can poll any task.
    pub tasks: TaskManager,
    post: Mutex<(HashMap<JobId, PostProcess>, VecDeque<JobId>)>,
    /// Jobs that calls in progress are waiting for: their results have nowhere to
    /// go once the client is gone, so they are cancelled when the gateway stops.
    waited: Mutex<HashSet<JobId>>,
}

/// Marks jobs as waited for by a call until it is dropped.
pub struct Waiting<'a> {
    gw: &'a Gateway,
    jobs: Vec<JobId>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut waited = self.gw.waited.lock().expect("not poisoned");
        for job in &self.jobs {
            waited.remove(job);
        }
    }
}

impl Gateway {
    pub fn new(client: Client, cfg: McpConfig, roots: AllowedRoots) -> Gateway {
        Gateway {
            client_name: client.options().name.clone(),
            client,
            cfg,
            roots,
            tasks: TaskManager::new(),
            post: Mutex::default(),
            waited: Mutex::default(),
        }
    }

    /// Remembers that `job`'s images get `post` before they are returned or saved.
    pub fn remember(&self, job: JobId, post: PostProcess) {
        if post.is_none() {
            return;
        }
        let mut guard = self.post.lock().expect("not poisoned");
        let (map, order) = &mut *guard;
        if map.insert(job, post).is_none() {
            order.push_back(job);
        }
        while order.len() > REMEMBERED_JOBS {
            if let Some(old) = order.pop_front() {
                map.remove(&old);
            }
        }
    }

    /// Records that a call waits for `jobs` (see [`Gateway::cancel_waited`]).
    pub fn waiting(&self, jobs: Vec<JobId>) -> Waiting<'_> {
        self.waited
            .lock()
            .expect("not poisoned")
            .extend(jobs.iter().copied());
        Waiting { gw: self, jobs }
    }

    /// Cancels every job a call is still waiting for: the gateway is stopping or
    /// its client went away, so nobody will receive their results. Bounded by
    /// `limit` so a dead broker cannot hold up the exit.
    pub async fn cancel_waited(&self, limit: Duration) {
        let jobs: Vec<JobId> = self
            .waited
            .lock()
            .expect("not poisoned")
            .iter()
            .copied()
            .collect();
        if jobs.is_empty() {
            return;
        }
        tracing::info!(jobs = jobs.len(), "cancelling the jobs of unfinished calls");
        let cancels = futures::future::join_all(jobs.iter().map(|id| self.client.cancel(*id)));
        if tokio::time::timeout(limit, cancels).await.is_err() {
            tracing::warn!("the broker did not confirm every cancel in time");
        }
    }

    pub fn post_process(&self, job: JobId) -> PostProcess {
        self.post
            .lock()
            .expect("not poisoned")
            .0
            .get(&job)
            .copied()
            .unwrap_or_default()
    }
}

/// The broker connection described by the `[client]` table. The client name
/// defaults to `kiln-mcp` so `list_jobs mine` can find the gateway's jobs.
pub fn client_options(cfg: &KilnConfig) -> Result<ClientOptions, kiln_config::ConfigError> {
    let mut opts = cfg.client_options()?;
    opts.name.get_or_insert_with(|| "kiln-mcp".into());
    Ok(opts)
}
