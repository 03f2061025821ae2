//! The admin channel: operator commands against a running `serve`.
//!
//! sled allows one process per database, so `stowage serve` holds the cache (its lock file) and
//! an operator command started beside it cannot open it. Instead `serve` listens on a Unix socket,
//! `<storage.path>/admin.sock` (mode 0600: **only the file permissions guard it**, whoever can
//! connect can run every command below), and executes the commands there, through its own
//! [`Mirror`]: a `prefetch` shares single-flight fills with live client traffic, a `pin` is seen
//! by the running eviction at once.
//!
//! The protocol is HTTP/1.1 over the socket: `POST /v1/run` with a JSON [`Request`] and the
//! client's version in `Stowage-Version` (a server refuses a client of another version: 409); the
//! answer is a stream of [`Event`]s, one JSON object a line (NDJSON), ending with [`Event::End`]. The
//! command line renders the same events whether the command ran here ([`run_local`]) or in the
//! server ([`run_remote`]), with [`Display`]: the same stdout, stderr and exit code either way.
//!
//! Every operator command goes through the socket when a server answers there: `prefetch`,
//! `pin`, `unpin`, `ls`, `verify`, `gc`, `export`, `import`. Paths (`export -o`, the `import`
//! bundle) are made absolute by the client and read or written by the server's process.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::airgap::{self, PrefetchRequest};
use crate::cache::Cache;
use crate::config::Config;
use crate::hosted::Hosted;
use crate::mirror::Mirror;
use crate::ops::{self, Event, OpsError};

/// The socket's file name under `storage.path`.
pub const SOCKET_NAME: &str = "admin.sock";

/// The header naming the stowage version on each side of the socket. The [`Request`] and
/// [`Event`] shapes are not a stable interface, so a server runs commands only from a client of
/// its own version and refuses others (409) before reading the request.
pub const VERSION_HEADER: &str = "stowage-version";

/// This build's version, as sent in [`VERSION_HEADER`].
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Where `serve` listens for operator commands on the cache at `storage_path`.
pub fn socket_path(storage_path: &Path) -> PathBuf {
    storage_path.join(SOCKET_NAME)
}

/// An operator command, as sent over the socket.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Request {
    Prefetch(PrefetchRequest),
    Pin {
        images: Vec<String>,
    },
    Unpin {
        images: Vec<String>,
    },
    Ls,
    Verify {
        repair: bool,
    },
    /// `dry_run`: hosted content is reported, nothing removed; the cache is not collected.
    Gc {
        #[serde(default)]
        dry_run: bool,
    },
    /// `output` is absolute (the client resolves it against its own working directory); a
    /// trailing `/` asks for a directory, as on the command line.
    Export {
        images: Vec<String>,
        output: PathBuf,
        /// Also each image's referrers, recursively.
        #[serde(default)]
        with_referrers: bool,
    },
    /// `bundle` is absolute, like `Export::output`.
    Import {
        bundle: PathBuf,
        pin: bool,
    },
}

// ---------------------------------------------------------------------------------------------
// Executing a command (here, or in the server)
// ---------------------------------------------------------------------------------------------

/// Runs a command other than `prefetch` on an open cache, writing its report to `out`. Returns
/// whether it succeeded (`verify` without `--repair` fails when it finds damage). `here`: the
/// command line's own process (which may draw progress on its stderr), not the server.
pub fn execute(
    cache: &Cache,
    hosted: Option<&Hosted>,
    config: &Config,
    req: &Request,
    here: bool,
    out: &mut dyn Write,
) -> Result<bool, OpsError> {
    match req {
        Request::Pin { images } => ops::pin(cache, config, images, out).map(|_| true),
        Request::Unpin { images } => ops::unpin(cache, config, images, out).map(|_| true),
        Request::Ls => {
            ops::ls(cache, out)?;
            if let Some(h) = hosted {
                ops::hosted::ls(h, out)?;
            }
            Ok(true)
        }
        Request::Verify { repair } => {
            let cached = ops::verify(cache, *repair, here, out).map(|r| r.clean() || *repair)?;
            let hosted_ok = match hosted {
                Some(h) => ops::hosted::verify(h, out)?,
                None => true,
            };
            Ok(cached && hosted_ok)
        }
        Request::Gc { dry_run } => {
            if *dry_run {
                let _ = writeln!(
                    out,
                    "gc --dry-run: reporting hosted content only; the cache is not collected"
                );
            } else {
                ops::gc(cache, config.storage.gc_max_age, out)?;
            }
            if let Some(h) = hosted {
                ops::hosted::gc(h, *dry_run, out)?;
            }
            Ok(true)
        }
        Request::Export {
            images,
            output,
            with_referrers,
        } => airgap::export(cache, hosted, config, images, output, *with_referrers, out)
            .map(|_| true),
        Request::Import { bundle, pin } => {
            airgap::import(cache, hosted, bundle, *pin, out).map(|_| true)
        }
        Request::Prefetch(_) => Err(OpsError::Usage(
            "prefetch needs the mirror, not only the cache".into(),
        )),
    }
}

/// Sends what a command writes as [`Event::Out`], a chunk of whole lines at a time.
struct EventWriter {
    tx: tokio::sync::mpsc::UnboundedSender<Event>,
    buf: Vec<u8>,
}

impl EventWriter {
    fn send(&mut self, upto: usize) {
        let chunk: Vec<u8> = self.buf.drain(..upto).collect();
        let _ = self.tx.send(Event::Out {
            text: String::from_utf8_lossy(&chunk).into_owned(),
        });
    }
}

impl Write for EventWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(bytes);
        if let Some(last) = self.buf.iter().rposition(|b| *b == b'\n') {
            self.send(last + 1);
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            self.send(self.buf.len());
        }
        Ok(())
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

/// Runs `req` through `mirror`, sending its events (and last [`Event::End`]) to `tx`.
async fn execute_in(
    mirror: Arc<Mirror>,
    hosted: Option<Arc<Hosted>>,
    req: Request,
    tx: tokio::sync::mpsc::UnboundedSender<Event>,
) {
    let result = match req {
        Request::Prefetch(p) => {
            let events = tx.clone();
            let emit = move |e: Event| {
                let _ = events.send(e);
            };
            airgap::prefetch(mirror, &p, &emit).await
        }
        req => {
            let m = mirror.clone();
            let mut out = EventWriter {
                tx: tx.clone(),
                buf: Vec::new(),
            };
            tokio::task::spawn_blocking(move || {
                execute(
                    &m.cache,
                    hosted.as_deref(),
                    &m.config,
                    &req,
                    false,
                    &mut out,
                )
            })
            .await
            .unwrap_or_else(|e| Err(OpsError::Usage(format!("the command failed: {e}"))))
        }
    };
    let _ = tx.send(match result {
        Ok(ok) => Event::End { ok, error: None },
        Err(e) => Event::End {
            ok: false,
            error: Some(e.to_string()),
        },
    });
}

/// Runs a command in this process on the cache (which must not be held by a `serve`),
/// rendering it with `display`. Returns whether it succeeded; `Err` only when it could not run.
pub fn run_local(config: &Config, req: &Request, display: &mut Display) -> Result<bool, OpsError> {
    let Request::Prefetch(p) = req else {
        return run_local_command(config, req);
    };
    let mirror = Arc::new(Mirror::new(config.clone()).map_err(|e| match e {
        crate::Error::Cache(c) => OpsError::Cache(c),
        other => OpsError::Usage(other.to_string()),
    })?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| OpsError::Usage(format!("cannot start the runtime: {e}")))?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let task = runtime.spawn(execute_in(
        mirror.clone(),
        None,
        Request::Prefetch(p.clone()),
        tx,
    ));
    let ended = runtime.block_on(async {
        while let Some(e) = rx.recv().await {
            if let Some(ok) = display.handle(e) {
                return Some(ok);
            }
        }
        None
    });
    let _ = runtime.block_on(task);
    if let Some(fleet) = &mirror.fleet {
        // What was fetched is shared with the fleet before the process exits.
        runtime.block_on(fleet.settle(std::time::Duration::from_secs(600)));
    }
    ended.ok_or_else(|| OpsError::Usage("prefetch stopped without a result".into()))
}

/// Runs a command other than `prefetch` in this process. Hosted operations reach async code
/// through a runtime entered here ([`Hosted::wait`]); with a shared store and `[hosted]`, the
/// store is opened as `serve` opens it, so hosted commands see the fleet's content.
fn run_local_command(config: &Config, req: &Request) -> Result<bool, OpsError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| OpsError::Usage(format!("cannot start the runtime: {e}")))?;
    let _entered = runtime.enter();
    let mirror = match (&config.storage.shared, &config.hosted) {
        (Some(_), Some(_)) => Some(Mirror::new(config.clone()).map_err(|e| match e {
            crate::Error::Cache(c) => OpsError::Cache(c),
            other => OpsError::Usage(other.to_string()),
        })?),
        _ => None,
    };
    let own_cache;
    let cache = match &mirror {
        Some(m) => &m.cache,
        None => {
            own_cache = Cache::open(&config.storage)?;
            &own_cache
        }
    };
    let hosted = match &config.hosted {
        Some(settings) => {
            let mut h = Hosted::open(settings.clone(), &config.storage.path)
                .map_err(|e| OpsError::Usage(e.to_string()))?;
            if let Some(fleet) = mirror.as_ref().and_then(|m| m.fleet.as_ref()) {
                h = h.with_shared_store(fleet.store(), fleet.timeout());
            }
            Some(h)
        }
        None => None,
    };
    let out = &mut std::io::stdout().lock();
    let result = execute(cache, hosted.as_ref(), config, req, true, out);
    cache.flush()?;
    result
}

// ---------------------------------------------------------------------------------------------
// The server side
// ---------------------------------------------------------------------------------------------

/// The admin socket of a running `serve`. [`AdminServer::stop`] closes it and removes the file.
pub struct AdminServer {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
    /// Cancelled by [`AdminServer::stop`]: commands still running end with an error event.
    stopping: tokio_util::sync::CancellationToken,
}

/// What the handler needs.
#[derive(Clone)]
struct AdminState {
    mirror: Arc<Mirror>,
    hosted: Option<Arc<Hosted>>,
    stopping: tokio_util::sync::CancellationToken,
}

/// How long [`AdminServer::stop`] waits for interrupted commands to tell their clients.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// Aborts a command's task when its response stream is dropped (client gone, server stopping).
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl AdminServer {
    /// Listens on `<storage.path>/admin.sock`. The caller holds the cache lock, so a socket file
    /// already there is a dead server's: it is removed. The socket is bound inside a fresh 0700
    /// directory, made 0600 and only then renamed into place, so it is never reachable with
    /// looser permissions.
    pub fn start(mirror: Arc<Mirror>, hosted: Option<Arc<Hosted>>) -> std::io::Result<AdminServer> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let root = mirror.config.storage.path.clone();
        let path = socket_path(&root);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let staging = root.join(format!(".admin-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::DirBuilder::new().mode(0o700).create(&staging)?;
        let bind = || -> std::io::Result<tokio::net::UnixListener> {
            let tmp = staging.join(SOCKET_NAME);
            let listener = tokio::net::UnixListener::bind(&tmp)?;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
            std::fs::rename(&tmp, &path)?;
            Ok(listener)
        };
        let listener = bind();
        let _ = std::fs::remove_dir_all(&staging);
        let listener = listener?;
        let stopping = tokio_util::sync::CancellationToken::new();
        let app = axum::Router::new()
            .route("/v1/run", axum::routing::post(run_handler))
            .with_state(AdminState {
                mirror,
                hosted,
                stopping: stopping.clone(),
            });
        let shutdown = stopping.clone().cancelled_owned();
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
            {
                tracing::error!(error = %e, "admin socket stopped");
            }
        });
        Ok(AdminServer {
            path,
            task,
            stopping,
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops listening, interrupts the commands still running (their clients get an error
    /// event), waits a moment for them to be told, and removes the socket file.
    pub async fn stop(mut self) {
        self.stopping.cancel();
        if tokio::time::timeout(STOP_GRACE, &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
            let _ = self.task.await;
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A plain-text refusal (the client prints it after the status).
fn refuse(status: http::StatusCode, text: String) -> axum::response::Response {
    let mut r = axum::response::Response::new(axum::body::Body::from(text));
    *r.status_mut() = status;
    r
}

async fn run_handler(
    axum::extract::State(state): axum::extract::State<AdminState>,
    headers: http::HeaderMap,
    body: bytes::Bytes,
) -> axum::response::Response {
    let client = headers
        .get(VERSION_HEADER)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    if client.as_deref() != Some(VERSION) {
        let client = client.unwrap_or_else(|| "an older stowage (no version sent)".into());
        tracing::warn!(%client, "admin command refused: version mismatch");
        return refuse(
            http::StatusCode::CONFLICT,
            format!(
                "the running serve is stowage {VERSION}, this command is {client}: \
                 run the command with the serve's binary, or stop serve to run it on the cache"
            ),
        );
    }
    let req: Request = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return refuse(
                http::StatusCode::BAD_REQUEST,
                format!("not a stowage admin request: {e}"),
            )
        }
    };
    tracing::info!(command = ?req, "admin command");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let interrupted = tx.clone();
    let task = tokio::spawn(async move {
        tokio::select! {
            () = execute_in(state.mirror, state.hosted, req, tx) => {}
            () = state.stopping.cancelled() => {
                let _ = interrupted.send(Event::End {
                    ok: false,
                    error: Some("serve is stopping: the command was interrupted".into()),
                });
            }
        }
    });
    ndjson(rx, AbortOnDrop(task.abort_handle()))
}

/// The events of `rx` as an NDJSON body; `guard` lives as long as the body.
fn ndjson(
    rx: tokio::sync::mpsc::UnboundedReceiver<Event>,
    guard: AbortOnDrop,
) -> axum::response::Response {
    let stream = futures_util::stream::unfold((rx, guard), |(mut rx, guard)| async move {
        let e = rx.recv().await?;
        let mut line = serde_json::to_vec(&e).unwrap_or_default();
        line.push(b'\n');
        Some((
            Ok::<_, std::convert::Infallible>(bytes::Bytes::from(line)),
            (rx, guard),
        ))
    });
    axum::response::Response::builder()
        .header(http::header::CONTENT_TYPE, "application/x-ndjson")
        .header(VERSION_HEADER, VERSION)
        .body(axum::body::Body::from_stream(stream))
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// The client side
// ---------------------------------------------------------------------------------------------

/// Sends `req` to the `serve` running on the cache at `storage_path` and renders its events.
/// `Ok(None)`: no server answers there (no socket, or a dead one's), so run the command locally.
/// `Ok(Some(ok))`: the server ran it. `Err`: a server is there but the command could not be
/// completed through it.
pub fn run_remote(
    storage_path: &Path,
    req: &Request,
    display: &mut Display,
) -> Result<Option<bool>, String> {
    let path = socket_path(storage_path);
    if !path.exists() {
        return Ok(None);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    runtime.block_on(remote(&path, req, display))
}

/// Sends `req` over the socket at `path` and renders the events of the answer, up to
/// [`Event::End`]. `Ok(None)`: no server listens there.
async fn remote(path: &Path, req: &Request, display: &mut Display) -> Result<Option<bool>, String> {
    let Some(stream) = connect(path).await? else {
        return Ok(None);
    };
    let failed = |e: &dyn std::fmt::Display| {
        format!(
            "the admin socket {} of the running serve: {e}",
            path.display()
        )
    };
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| failed(&e))?;
    let conn = tokio::spawn(conn);
    let body = serde_json::to_vec(req).map_err(|e| failed(&e))?;
    let request = http::Request::post("/v1/run")
        .header(http::header::HOST, "stowage-admin")
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(VERSION_HEADER, VERSION)
        .body(axum::body::Body::from(body))
        .map_err(|e| failed(&e))?;
    let response = sender.send_request(request).await.map_err(|e| failed(&e))?;
    let status = response.status();
    let body = axum::body::Body::new(response.into_body());
    let read = read_events(body, status.is_success(), display).await;
    conn.abort();
    let (result, rest) = read.map_err(|e| failed(&e))?;
    if !status.is_success() {
        return Err(failed(&format!(
            "answered {status}: {}",
            String::from_utf8_lossy(&rest).trim()
        )));
    }
    result.map(Some).ok_or_else(|| {
        failed(&"the connection closed before the command finished (did serve stop?)")
    })
}

/// Connects to the socket at `path`: `None` when nothing listens there (no file, or a dead
/// server's).
async fn connect(path: &Path) -> Result<Option<tokio::net::UnixStream>, String> {
    match tokio::net::UnixStream::connect(path).await {
        Ok(s) => Ok(Some(s)),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(format!(
            "cannot connect to the admin socket {} of the running serve: {e} \
             (it is open only to the user running serve)",
            path.display()
        )),
    }
}

/// Reads an answer's body. With `events` (a success), renders its NDJSON events up to
/// [`Event::End`] and returns its `ok`; otherwise collects the body (a refusal's text). Returns
/// also what was read and not rendered.
async fn read_events(
    body: axum::body::Body,
    events: bool,
    display: &mut Display,
) -> Result<(Option<bool>, Vec<u8>), Box<dyn std::error::Error + Send + Sync>> {
    use futures_util::StreamExt;
    let mut body = body.into_data_stream();
    let mut buf: Vec<u8> = Vec::new();
    while let Some(chunk) = body.next().await {
        buf.extend_from_slice(&chunk?);
        if !events {
            continue;
        }
        while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            let event: Event = serde_json::from_slice(&line)?;
            if let Some(ok) = display.handle(event) {
                return Ok((Some(ok), buf));
            }
        }
    }
    Ok((None, buf))
}

// ---------------------------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------------------------

/// Plain progress lines (no terminal) are printed at most this often per image.
const PLAIN_EVERY: Duration = Duration::from_secs(5);

/// One image being prefetched.
struct ImageLine {
    image: String,
    total: u64,
    bar: Option<indicatif::ProgressBar>,
    last_line: Instant,
}

/// Renders [`Event`]s: reports on stdout, errors on stderr. While images prefetch, stderr shows
/// one indicatif bar per image (bytes, rate, ETA) on a terminal, or plain lines otherwise (one
/// when an image starts, its byte count at most every few seconds).
pub struct Display {
    multi: Option<indicatif::MultiProgress>,
    images: HashMap<usize, ImageLine>,
}

impl Default for Display {
    fn default() -> Self {
        Display::new()
    }
}

impl Display {
    /// Bars if stderr is a terminal, plain lines otherwise.
    pub fn new() -> Display {
        Display::with_bars(std::io::stderr().is_terminal().then(|| {
            indicatif::MultiProgress::with_draw_target(indicatif::ProgressDrawTarget::stderr())
        }))
    }

    /// Bars drawn by `multi`, or plain lines without.
    pub fn with_bars(multi: Option<indicatif::MultiProgress>) -> Display {
        Display {
            multi,
            images: HashMap::new(),
        }
    }

    fn stdout(&self, text: &str) {
        let print = || {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(text.as_bytes());
            let _ = out.flush();
        };
        match &self.multi {
            Some(m) => m.suspend(print),
            None => print(),
        }
    }

    fn stderr(&self, line: &str) {
        let print = || eprintln!("{line}");
        match &self.multi {
            Some(m) => m.suspend(print),
            None => print(),
        }
    }

    fn close(&mut self, id: usize) {
        if let Some(ImageLine { bar: Some(bar), .. }) = self.images.remove(&id) {
            bar.finish_and_clear();
            if let Some(m) = &self.multi {
                m.remove(&bar);
            }
        }
    }

    /// [`Event::Start`]: a bar for image `id`, or a plain line saying what it will fetch.
    fn start(&mut self, id: usize, image: String, blobs: usize, cached: usize, bytes: u64) {
        let bar = self.multi.as_ref().map(|m| {
            let bar = m.add(indicatif::ProgressBar::new(bytes));
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{prefix:.bold} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_prefix(image.clone());
            bar
        });
        if bar.is_none() {
            self.stderr(&format!(
                "prefetch {image}: {blobs} blob(s), {cached} already cached, {} to fetch",
                ops::human(bytes)
            ));
        }
        self.images.insert(
            id,
            ImageLine {
                image,
                total: bytes,
                bar,
                last_line: Instant::now(),
            },
        );
    }

    /// [`Event::Progress`]: moves image `id`'s bar, or prints a plain line at most every
    /// [`PLAIN_EVERY`].
    fn progress(&mut self, id: usize, bytes: u64) {
        let mut line = None;
        if let Some(i) = self.images.get_mut(&id) {
            match &i.bar {
                Some(bar) => bar.set_position(bytes),
                None if i.last_line.elapsed() >= PLAIN_EVERY => {
                    i.last_line = Instant::now();
                    line = Some(format!(
                        "prefetch {}: {} of {} fetched",
                        i.image,
                        ops::human(bytes),
                        ops::human(i.total)
                    ));
                }
                None => {}
            }
        }
        if let Some(line) = line {
            self.stderr(&line);
        }
    }

    /// Renders one event; returns `Some(ok)` at [`Event::End`].
    pub fn handle(&mut self, event: Event) -> Option<bool> {
        match event {
            Event::Out { text } => self.stdout(&text),
            Event::Err { line } => self.stderr(&line),
            Event::Start {
                id,
                image,
                blobs,
                cached,
                bytes,
            } => self.start(id, image, blobs, cached, bytes),
            Event::Progress { id, bytes } => self.progress(id, bytes),
            Event::Done {
                id,
                image,
                manifests,
                blobs,
                cached,
                bytes,
                secs,
            } => {
                self.close(id);
                let secs = secs.max(0.001);
                self.stdout(&format!(
                    "prefetched {image}: {manifests} manifest(s), {blobs} blob(s) ({cached} already cached), {bytes} bytes fetched in {secs:.1}s ({:.1} MiB/s)\n",
                    bytes as f64 / secs / (1024.0 * 1024.0)
                ));
            }
            Event::Failed { id, image, error } => {
                self.close(id);
                self.stderr(&format!("stowage: prefetch {image} failed: {error}"));
            }
            Event::Summary {
                ok,
                failed,
                fetched,
                cached,
                bytes,
                secs,
            } => {
                self.stdout(&format!(
                    "prefetch: {ok} image(s) fetched, {failed} failed; {fetched} blob(s) fetched, {cached} already cached, {} in {secs:.1}s\n",
                    ops::human(bytes)
                ));
            }
            Event::End { ok, error } => {
                let ids: Vec<usize> = self.images.keys().copied().collect();
                for id in ids {
                    self.close(id);
                }
                if let Some(e) = error {
                    self.stderr(&format!("stowage: {e}"));
                }
                return Some(ok);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_events_round_trip_as_json() {
        let req = Request::Prefetch(PrefetchRequest {
            refs: vec!["alpine:3.19".into()],
            platforms: airgap::Platforms::Some(vec!["linux/arm64/v8".into()]),
            pin: true,
            with_referrers: true,
        });
        let text = serde_json::to_string(&req).unwrap();
        assert!(text.contains("\"command\":\"prefetch\""), "{text}");
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), req);
        let all = Request::Prefetch(PrefetchRequest {
            refs: vec![],
            platforms: airgap::Platforms::All,
            pin: false,
            with_referrers: false,
        });
        let text = serde_json::to_string(&all).unwrap();
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), all);
        let e = Event::End {
            ok: false,
            error: Some("x".into()),
        };
        let text = serde_json::to_string(&e).unwrap();
        assert_eq!(text, r#"{"event":"end","ok":false,"error":"x"}"#);
        assert_eq!(serde_json::from_str::<Event>(&text).unwrap(), e);
    }

    #[test]
    fn command_output_goes_out_in_whole_lines() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut w = EventWriter {
            tx,
            buf: Vec::new(),
        };
        write!(w, "a\nb").unwrap();
        write!(w, "c\nd").unwrap();
        drop(w);
        let mut got = Vec::new();
        while let Ok(Event::Out { text }) = rx.try_recv() {
            got.push(text);
        }
        assert_eq!(got, ["a\n", "bc\n", "d"]);
    }

    #[test]
    fn bars_render_a_whole_prefetch() {
        let mut d = Display::with_bars(Some(indicatif::MultiProgress::with_draw_target(
            indicatif::ProgressDrawTarget::hidden(),
        )));
        let start = |id| Event::Start {
            id,
            image: format!("docker.io/library/i{id}:1"),
            blobs: 2,
            cached: 0,
            bytes: 100,
        };
        for e in [start(0), start(1)] {
            assert_eq!(d.handle(e), None);
        }
        assert_eq!(d.handle(Event::Progress { id: 0, bytes: 50 }), None);
        assert_eq!(d.handle(Event::Progress { id: 7, bytes: 50 }), None);
        assert_eq!(
            d.handle(Event::Failed {
                id: 1,
                image: "docker.io/library/i1:1".into(),
                error: "no".into()
            }),
            None
        );
        assert_eq!(d.images.len(), 1);
        assert_eq!(
            d.handle(Event::End {
                ok: false,
                error: None
            }),
            Some(false)
        );
        assert!(d.images.is_empty());
    }
}
