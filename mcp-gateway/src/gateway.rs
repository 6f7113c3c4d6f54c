//! The state every MCP session shares: one broker [`Client`] (which multiplexes
//! any number of concurrent calls over one connection), the configuration, the
//! allowed roots, and what the gateway remembers about the jobs it submitted.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use kiln_config::{KilnConfig, McpConfig};
use kiln_protocol::{Client, ClientOptions, JobId, JobSnapshot};
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
    /// The broker's worker list, reused for a few seconds to describe the tools
    /// a call is checked against (see [`crate::tool_params`]).
    pub fleet: crate::tool_params::FleetCache,
    post: Mutex<(HashMap<JobId, PostProcess>, VecDeque<JobId>)>,
}

impl Gateway {
    pub fn new(client: Client, cfg: McpConfig, roots: AllowedRoots) -> Gateway {
        Gateway {
            client_name: client.options().name.clone(),
            client,
            cfg,
            roots,
            tasks: TaskManager::new(),
            fleet: Default::default(),
            post: Mutex::default(),
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

    /// What to do to `job`'s images: what this process remembers from the call
    /// that made it, else what the job's own parameters say (a sprite asked for
    /// with `background: "transparent"` is keyed out by any gateway process).
    pub fn post_process(&self, job: &JobSnapshot) -> PostProcess {
        if let Some(post) = self.post.lock().expect("not poisoned").0.get(&job.job_id) {
            return *post;
        }
        let transparent = job
            .params
            .as_ref()
            .and_then(|p| p.get("background"))
            .and_then(|b| b.as_str())
            == Some("transparent");
        PostProcess {
            remove_background: transparent,
            pixel_cell: None,
        }
    }
}

/// How often a followed job is asked for when no event arrives. A broker with
/// client tokens and no CURVE keeps its events port closed, and jobs are then
/// followed from `get` snapshots alone: at the client's default of 2 s an MCP
/// client would see a progress notification every other second at best.
const FOLLOW_RESYNC: Duration = Duration::from_millis(250);

/// The broker connection described by the `[client]` table. The client name
/// defaults to `kiln-mcp` so `list_jobs mine` can find the gateway's jobs.
pub fn client_options(cfg: &KilnConfig) -> Result<ClientOptions, kiln_config::ConfigError> {
    let mut opts = cfg.client_options()?;
    opts.name.get_or_insert_with(|| "kiln-mcp".into());
    opts.resync_interval = opts.resync_interval.min(FOLLOW_RESYNC);
    Ok(opts)
}
