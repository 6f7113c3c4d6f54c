//! The MCP server: the tools, resources and prompts of Kiln, served over any
//! transport. One [`KilnMcp`] is made per session (stdio has one; HTTP one per
//! session or request); all share the [`Gateway`] and so one broker connection.

use std::sync::Arc;
use std::time::Duration;

use kiln_protocol::{JobId, JobSpec, ListFilter};
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::tool::{schema_for_output, ToolCallContext};
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::*;
use rmcp::service::{NotificationContext, RequestContext};
use rmcp::task_manager::{TaskContext, TaskExit, TaskOptions};
use rmcp::{tool, tool_router, ErrorData as McpError, RoleServer, ServerHandler};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::args::*;
use crate::error::ToolError;
use crate::gateway::{Gateway, PostProcess};
use crate::jobs::{self, CallContext, CancelReasons, CancelSource, Cancelled, Ended};
use crate::render::{self, JobsReport};
use crate::save::{self, SaveReport};
use crate::tool_params::FLEET_TTL;
use crate::{fleet, inputs, prompts, resources, schema, spec, validate};

const INSTRUCTIONS: &str = "Kiln runs image and video generation on a fleet of GPUs. \
Generate tools wait for their result (sending progress when asked) and return images inline with links to the full files; \
with `wait: false` or after `timeout_s` (by default well under a minute) they return job ids and progress: continue with wait_for_job. \
Jobs keep running when a call times out or the client goes away; cancelling a call, or cancel_job, cancels them. \
Use list_models/list_loras for names, list_workers for GPUs, save_output to copy results into a game's assets.";

/// One MCP session's handler.
#[derive(Clone)]
pub struct KilnMcp {
    gw: Arc<Gateway>,
    tool_router: ToolRouter<KilnMcp>,
    /// Why the client cancelled its calls (a timeout leaves the jobs running).
    cancel_reasons: Arc<CancelReasons>,
}

fn report_schema() -> Arc<JsonObject> {
    schema_for_output::<JobsReport>()
}

fn save_schema() -> Arc<JsonObject> {
    schema_for_output::<SaveReport>()
}

impl KilnMcp {
    fn call_context(&self, ctx: &RequestContext<RoleServer>) -> CallContext {
        let task = ctx.extensions.get::<TaskContext>().cloned();
        // Over streamable HTTP at 2026-07-28 a request has no session: closing its
        // response stream is the protocol's one cancel signal (there are no
        // client notifications to say why), so the token firing is the cancel.
        let stateless_http = at_least(ctx, &ProtocolVersion::V_2026_07_28)
            && ctx.extensions.get::<axum::http::request::Parts>().is_some();
        CallContext {
            peer: Some(ctx.peer.clone()),
            progress_token: ctx.meta.get_progress_token(),
            cancel: ctx.ct.clone(),
            // A task's token fires only on `tasks/cancel`.
            cancel_source: if task.is_some() || stateless_http {
                CancelSource::Explicit
            } else {
                CancelSource::Request {
                    id: ctx.id.clone(),
                    reasons: self.cancel_reasons.clone(),
                }
            },
            task,
        }
    }
}

/// The first protocol version with the MCP Tasks extension (SEP-2663): task
/// handles (`resultType: "task"`) go only to sessions at least this new whose
/// client declares the extension. Older sessions (the TypeScript SDK and the
/// Inspector negotiate 2025-11-25) always get the plain result.
const TASKS_SINCE: ProtocolVersion = ProtocolVersion::V_2026_07_28;

/// Whether the request's protocol version is `version` or newer (versions are
/// dates, so they order as strings).
fn at_least(ctx: &RequestContext<RoleServer>, version: &ProtocolVersion) -> bool {
    ctx.protocol_version()
        .is_some_and(|v| v.as_str() >= version.as_str())
}

fn takes_tasks(ctx: &RequestContext<RoleServer>) -> bool {
    at_least(ctx, &TASKS_SINCE)
        && ctx
            .client_capabilities()
            .is_some_and(|c| c.supports_tasks())
}

/// The tools a client may run as MCP tasks: the ones that wait for generations.
const TASK_TOOLS: [&str; 6] = [
    "generate_image",
    "edit_image",
    "generate_video",
    "generate_batch",
    "generate_sprite",
    "run_workflow",
];

fn parse_job(s: &str) -> Result<JobId, ToolError> {
    s.parse()
        .map_err(|e: kiln_protocol::IdError| ToolError::invalid("job_id", e.to_string()))
}

/// The result of a call that stopped early (nobody may read it: the client
/// cancelled), in the error form every output schema admits.
fn cancelled_result(stopped: &Cancelled) -> CallToolResult {
    let mut r = CallToolResult::error(vec![ContentBlock::text(stopped.to_string())]);
    r.structured_content = Some(
        serde_json::json!({ "error": { "kind": "cancelled", "message": stopped.to_string() } }),
    );
    r
}

/// A JSON value as a tool result: pretty text plus structured content.
fn json_result(value: Result<Value, ToolError>) -> CallToolResult {
    match value {
        Ok(v) => {
            let mut r = CallToolResult::success(vec![ContentBlock::text(
                serde_json::to_string_pretty(&v).unwrap_or_default(),
            )]);
            r.structured_content = Some(v);
            r
        }
        Err(e) => e.into_result(),
    }
}

#[tool_router]
impl KilnMcp {
    pub fn new(gw: Arc<Gateway>) -> KilnMcp {
        let mut tool_router = Self::tool_router();
        for route in tool_router.map.values_mut() {
            route.attr.input_schema = schema::portable_input(&route.attr.input_schema);
            if let Some(output) = &route.attr.output_schema {
                route.attr.output_schema = Some(schema::portable_output(output));
            }
        }
        KilnMcp {
            gw,
            tool_router,
            cancel_reasons: Arc::default(),
        }
    }

    /// [`Self::generate`] for the tools that make one job.
    async fn generate_one(
        &self,
        spec: Result<JobSpec, ToolError>,
        wait: &WaitArgs,
        post: PostProcess,
        ctx: &RequestContext<RoleServer>,
    ) -> CallToolResult {
        self.generate(
            spec.map(|s| vec![s]),
            None,
            wait,
            post,
            self.call_context(ctx),
        )
        .await
    }

    /// Submits, waits, and renders: the shared body of every generate tool.
    async fn generate(
        &self,
        specs: Result<Vec<JobSpec>, ToolError>,
        prompts: Option<Vec<String>>,
        wait: &WaitArgs,
        post: PostProcess,
        call: CallContext,
    ) -> CallToolResult {
        let specs = match specs {
            Ok(s) => s,
            Err(e) => return e.into_result(),
        };
        // A task is polled, so it waits as long as the gateway allows.
        let timeout_s = match (&call.task, wait.timeout_s) {
            (Some(_), None) => Some(self.gw.cfg.max_wait_timeout_s),
            (_, t) => t,
        };
        let timeout = match jobs::wait_timeout(&self.gw, timeout_s) {
            Ok(t) => t,
            Err(e) => return e.into_result(),
        };
        let single = prompts.is_none();
        let (mut items, ended) = match jobs::run(&self.gw, specs, wait.wait, timeout, &call).await {
            Ok(r) => r,
            Err(stopped) => return cancelled_result(&stopped),
        };
        if single && items.len() == 1 && items[0].is_err() {
            if let Some(Err(e)) = items.pop() {
                return e.into_result();
            }
        }
        for s in items.iter().flatten() {
            self.gw.remember(s.job_id, post);
        }
        render::render(&self.gw, items, prompts, ended).await
    }

    #[tool(
        description = "Generate images from a text prompt on the GPU fleet. Waits for the result (progress notifications when a progress token is given) and returns the images inline plus links; cancelling the call cancels the job.",
        output_schema = report_schema()
    )]
    async fn generate_image(
        &self,
        Parameters(a): Parameters<GenerateImageArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> CallToolResult {
        let post = PostProcess::for_style(a.options.style);
        self.generate_one(
            spec::generate_image(&a, &fleet::defaults_for_fleet(&self.gw).await),
            &a.options.wait,
            post,
            &ctx,
        )
        .await
    }

    #[tool(
        description = "Edit an image (image-to-image): a prompt plus an input image given as a path the gateway may read, base64, or a Kiln artifact id; `strength` sets how much changes.",
        output_schema = report_schema()
    )]
    async fn edit_image(
        &self,
        Parameters(a): Parameters<EditImageArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> CallToolResult {
        let input = match inputs::load(&self.gw, &a.image, "image").await {
            Ok(i) => i,
            Err(e) => return e.into_result(),
        };
        let post = PostProcess::for_style(a.options.style);
        self.generate_one(
            spec::edit_image(&a, &fleet::defaults_for_fleet(&self.gw).await, input),
            &a.options.wait,
            post,
            &ctx,
        )
        .await
    }

    #[tool(
        description = "Generate a video from text, or from an image (image-to-video) when `image` is given. Length in `frames` or `seconds` at `fps`; backend `comfyui` or `wan2gp`. Returns links and paths with metadata.",
        output_schema = report_schema()
    )]
    async fn generate_video(
        &self,
        Parameters(a): Parameters<GenerateVideoArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> CallToolResult {
        let input = match &a.image {
            Some(img) => match inputs::load(&self.gw, img, "image").await {
                Ok(i) => Some(i),
                Err(e) => return e.into_result(),
            },
            None => None,
        };
        self.generate_one(
            spec::generate_video(&a, &fleet::defaults_for_fleet(&self.gw).await, input),
            &a.wait,
            PostProcess::default(),
            &ctx,
        )
        .await
    }

    #[tool(
        description = "Generate up to 50 images at once, one job per prompt with shared settings, spread over all capable GPUs. Returns per-item results; some may fail while the others succeed, each failure with its reason.",
        output_schema = report_schema()
    )]
    async fn generate_batch(
        &self,
        Parameters(a): Parameters<GenerateBatchArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> CallToolResult {
        let prompts: Vec<String> = a.prompts.iter().map(|p| p.prompt().to_string()).collect();
        let post = PostProcess::for_style(a.options.style);
        self.generate(
            spec::generate_batch(&a, &fleet::defaults_for_fleet(&self.gw).await),
            Some(prompts),
            &a.options.wait,
            post,
            self.call_context(&ctx),
        )
        .await
    }

    #[tool(
        description = "Generate game-asset sprites: style presets (pixel_art, 8bit, 16bit, retro, game_sprite) and a transparent (keyed out) or flat background. Save them into a game with save_output.",
        output_schema = report_schema()
    )]
    async fn generate_sprite(
        &self,
        Parameters(a): Parameters<GenerateSpriteArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> CallToolResult {
        let style = a.options.style.unwrap_or(StylePreset::GameSprite);
        let post = PostProcess {
            remove_background: a.background == Background::Transparent,
            pixel_cell: spec::style_words(style).2,
        };
        self.generate_one(
            spec::generate_sprite(&a, &fleet::defaults_for_fleet(&self.gw).await),
            &a.options.wait,
            post,
            &ctx,
        )
        .await
    }

    #[tool(
        description = "Run a raw ComfyUI API-format workflow (or a named template) with parameter overrides keyed `<node id>.<input>`.",
        output_schema = report_schema()
    )]
    async fn run_workflow(
        &self,
        Parameters(a): Parameters<RunWorkflowArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> CallToolResult {
        self.generate_one(
            spec::run_workflow(&a, &self.gw.cfg),
            &a.wait,
            PostProcess::default(),
            &ctx,
        )
        .await
    }

    #[tool(description = "A job's state, progress, worker/GPU, timings, outputs and error.", output_schema = report_schema(), annotations(read_only_hint = true))]
    async fn get_job(&self, Parameters(a): Parameters<JobIdArgs>) -> CallToolResult {
        let id = match parse_job(&a.job_id) {
            Ok(id) => id,
            Err(e) => return e.into_result(),
        };
        match self.gw.client.get(id).await {
            Ok(s) => render::render(&self.gw, vec![Ok(s)], None, Ended::Looked).await,
            Err(e) => ToolError::from(e).into_result(),
        }
    }

    #[tool(
        description = "Wait for a job to finish (progress notifications when a progress token is given) and return its result; returns the current state after `timeout_s`.",
        output_schema = report_schema(),
        annotations(read_only_hint = true)
    )]
    async fn wait_for_job(
        &self,
        Parameters(a): Parameters<WaitForJobArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> CallToolResult {
        let id = match parse_job(&a.job_id) {
            Ok(id) => id,
            Err(e) => return e.into_result(),
        };
        let timeout = match jobs::wait_timeout(&self.gw, a.timeout_s) {
            Ok(t) => t,
            Err(e) => return e.into_result(),
        };
        // Leaving the wait does not cancel the job: only cancel_job does.
        let call = CallContext {
            cancel: tokio_util::sync::CancellationToken::new(),
            ..self.call_context(&ctx)
        };
        let ids = [Ok(id)];
        let wait = jobs::follow_all(&self.gw, &ids, timeout, &call);
        let (latest, ended) = tokio::select! {
            r = wait => match r {
                Ok((latest, Ended::Finished)) => (latest, Ended::Followed),
                Ok(r) => r,
                Err(_) => (vec![None], Ended::TimedOut),
            },
            _ = ctx.ct.cancelled() => return cancelled_result(&Cancelled::Abandoned),
        };
        let item = match latest.into_iter().next().flatten() {
            Some(s) => Ok(s),
            None => self.gw.client.get(id).await.map_err(ToolError::from),
        };
        if let Err(e) = item {
            return e.into_result();
        }
        render::render(&self.gw, vec![item], None, ended).await
    }

    #[tool(
        description = "Cancel a queued or running job.",
        annotations(destructive_hint = true, idempotent_hint = true)
    )]
    async fn cancel_job(&self, Parameters(a): Parameters<JobIdArgs>) -> CallToolResult {
        let id = match parse_job(&a.job_id) {
            Ok(id) => id,
            Err(e) => return e.into_result(),
        };
        json_result(
            self.gw
                .client
                .cancel(id)
                .await
                .map(|r| serde_json::json!({ "job_id": r.job_id, "state": r.state, "note": if r.state.is_terminal() { "cancelled" } else { "cancel requested; the worker is stopping it" } }))
                .map_err(ToolError::from),
        )
    }

    #[tool(
        description = "List jobs, newest first: by default the queue (queued and running); filter by states, backend, worker, or only this gateway's jobs.",
        annotations(read_only_hint = true)
    )]
    async fn list_jobs(&self, Parameters(a): Parameters<ListJobsArgs>) -> CallToolResult {
        let states = if a.states.is_empty() {
            vec![StateArg::Queued, StateArg::Running]
        } else {
            a.states
        };
        let filter = ListFilter {
            states: states.into_iter().map(Into::into).collect(),
            backend: a.backend.map(Into::into),
            client: if a.mine {
                self.gw.client_name.clone()
            } else {
                None
            },
            worker: a.worker,
            limit: Some(a.limit as u64),
        };
        json_result(fleet::jobs(&self.gw, filter).await)
    }

    #[tool(
        description = "Models installed across the fleet, with the workers that have them and where they are loaded.",
        annotations(read_only_hint = true)
    )]
    async fn list_models(&self, Parameters(a): Parameters<ListModelsArgs>) -> CallToolResult {
        json_result(fleet::models(&self.gw, a.backend.map(Into::into), false).await)
    }

    #[tool(
        description = "LoRAs installed across the fleet.",
        annotations(read_only_hint = true)
    )]
    async fn list_loras(&self, Parameters(a): Parameters<ListModelsArgs>) -> CallToolResult {
        json_result(fleet::models(&self.gw, a.backend.map(Into::into), true).await)
    }

    #[tool(
        description = "GPU workers: name, GPU, VRAM free/total, models resident in GPU memory, state and current job.",
        annotations(read_only_hint = true)
    )]
    async fn list_workers(&self, Parameters(_): Parameters<NoArgs>) -> CallToolResult {
        json_result(fleet::workers(&self.gw).await)
    }

    #[tool(
        description = "The broker's health: workers online/idle/busy, jobs queued/running, version.",
        annotations(read_only_hint = true)
    )]
    async fn health(&self, Parameters(_): Parameters<NoArgs>) -> CallToolResult {
        json_result(fleet::health(&self.gw).await)
    }

    #[tool(
        description = "Copy a job's outputs into a directory under the gateway's allowed roots (never outside them), optionally adding them to a JSON asset manifest a Bevy game loads.",
        output_schema = save_schema()
    )]
    async fn save_output(&self, Parameters(a): Parameters<SaveOutputArgs>) -> CallToolResult {
        match save::save_output(&self.gw, &a).await {
            Ok(report) => {
                let lines: Vec<String> = report
                    .saved
                    .iter()
                    .map(|f| format!("{} saved to {}", f.artifact, f.path))
                    .collect();
                let mut r = CallToolResult::success(vec![ContentBlock::text(lines.join("\n"))]);
                r.structured_content = serde_json::to_value(&report).ok();
                r
            }
            Err(e) => e.into_result(),
        }
    }
}

impl KilnMcp {
    /// Runs a generate call as an MCP task: the call returns the task handle at
    /// once; `tasks/get` reports the progress as the status message and, at the
    /// end, the same result the call would have returned; `tasks/cancel` cancels
    /// the jobs at the broker.
    fn spawn_task(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> CallToolResponse {
        let this = self.clone();
        let cancel = CancellationToken::new();
        let mut ctx = context;
        ctx.ct = cancel.clone();
        // The request is answered with the handle: no progress notifications for it.
        ctx.meta = RequestMetaObject::default();
        let name = request.name.to_string();
        let ttl_ms = (self.gw.cfg.max_wait_timeout_s + 600) * 1000;
        let options = TaskOptions::new()
            .with_ttl_ms(ttl_ms)
            .with_status_message(format!("{name}: submitting"));
        let task = self.gw.tasks.spawn(options, move |task_ctx| {
            Box::pin(async move {
                ctx.extensions.insert(task_ctx.clone());
                let watcher = tokio::spawn({
                    let cancel = cancel.clone();
                    async move {
                        task_ctx.cancelled().await;
                        cancel.cancel();
                    }
                });
                let response = this
                    .tool_router
                    .call(ToolCallContext::new(&this, request, ctx))
                    .await;
                watcher.abort();
                if cancel.is_cancelled() {
                    return Err(TaskExit::Cancelled);
                }
                match response {
                    Ok(CallToolResponse::Complete(result)) => Ok(result),
                    Ok(_) => Err(TaskExit::Error(McpError::internal_error(
                        "the tool did not complete",
                        None,
                    ))),
                    Err(e) => Err(TaskExit::Error(e)),
                }
            })
        });
        CallToolResponse::Task(CreateTaskResult::new(task))
    }
}

impl ServerHandler for KilnMcp {
    fn get_info(&self) -> ServerConfig {
        let capabilities = ServerCapabilities::builder()
            .enable_tools()
            .enable_resources()
            .enable_prompts()
            .enable_tasks()
            .build();
        ServerConfig::new(capabilities)
            .with_server_info(Implementation::new("kiln-mcp", env!("CARGO_PKG_VERSION")))
            .with_instructions(INSTRUCTIONS)
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        // Check the arguments against the tool's published schema first, so the
        // assistant learns which field is wrong and what range it allows.
        let mut request = request;
        if let Some(tool) = self.tool_router.get(&request.name) {
            let mut described = [tool.clone()];
            crate::tool_params::describe(&self.gw, &mut described, FLEET_TTL).await;
            let tool = &described[0];
            let mut args = request.arguments.take().unwrap_or_default();
            validate::coerce_arguments(&tool.input_schema, &mut args);
            if let Err(e) = validate::check_arguments(&tool.input_schema, &args) {
                return Ok(e.into_result().into());
            }
            request.arguments = Some(args);
        }
        if takes_tasks(&context) && TASK_TOOLS.contains(&request.name.as_ref()) {
            return Ok(self.spawn_task(request, context));
        }
        self.tool_router
            .call(ToolCallContext::new(self, request, context))
            .await
    }

    async fn on_cancelled(
        &self,
        notification: CancelledNotificationParam,
        _context: NotificationContext<RoleServer>,
    ) {
        if let Some(id) = notification.request_id {
            self.cancel_reasons.record(id, notification.reason);
        }
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        let mut tools = self.tool_router.list_all();
        crate::tool_params::describe(&self.gw, &mut tools, Duration::ZERO).await;
        Ok(ListToolsResult::with_all_items(tools))
    }

    fn get_tool(&self, name: &str) -> Option<Tool> {
        self.tool_router.get(name).cloned()
    }

    async fn get_task(
        &self,
        request: GetTaskParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<GetTaskResult, McpError> {
        self.gw
            .tasks
            .get_task(&request.task_id)
            .map(GetTaskResult::new)
    }

    async fn cancel_task(
        &self,
        request: CancelTaskParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<(), McpError> {
        self.gw.tasks.cancel_task(&request.task_id)
    }

    async fn list_resources(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, McpError> {
        Ok(ListResourcesResult::with_all_items(resources::list()))
    }

    async fn list_resource_templates(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListResourceTemplatesResult, McpError> {
        Ok(ListResourceTemplatesResult::with_all_items(
            resources::templates(),
        ))
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, McpError> {
        resources::read(&self.gw, &request.uri)
            .await
            .map(Into::into)
    }

    async fn list_prompts(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListPromptsResult, McpError> {
        Ok(ListPromptsResult::with_all_items(prompts::list()))
    }

    async fn get_prompt(
        &self,
        request: GetPromptRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<GetPromptResponse, McpError> {
        prompts::get_prompt(&request.name, &request.arguments.unwrap_or_default()).map(Into::into)
    }
}
