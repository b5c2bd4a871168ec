//! The `sdstream` command line: `serve` (the server, until SIGINT or SIGTERM), `run` (a video
//! file through one stream into a video file) and `replay` (a recorded stream through a fresh
//! engine).

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::{Value, json};

use super::args::{engine_settings, json_arg};
use super::{HttpConfig, Server, ServerConfig};
use crate::hls::HlsConfig;
use crate::webrtc::{EncoderSettings, IceServer, TransportConfig};
use sdstream::ids::random_hex;
use sdstream::{EngineSettings, StreamDiffusionParams};

const USAGE: &str = "\
sdstream: real-time StreamDiffusion behind Daydream's HTTP API, with WHIP ingest and WHEP playback

usage: sdstream serve [FLAGS]        run the server (until SIGINT or SIGTERM)
       sdstream run --input PATH --output PATH [FLAGS]
                                     a video file (or a folder of pictures) through one stream
                                     into a video file (or a folder of PNG frames)
       sdstream replay --record DIR  run a recorded stream through a fresh engine and compare
       sdstream --version

`sdstream serve --help` and `sdstream run --help` list their flags.";

const SERVE_USAGE: &str = "\
usage: sdstream serve [FLAGS]   (--flag value or --flag=value)

The API token is SDSTREAM_API_TOKEN (one is made up and printed when it is unset). Logs go to
stderr; their filter is SDSTREAM_LOG or RUST_LOG (default: sdstream=info,warn).

  --bind ADDR                 where to listen (default 127.0.0.1:8088)
  --public-url URL            the URL clients reach the server at, the base of the WHIP/WHEP
                              URLs it hands out (default http://<bind address>)
  --instance NAME             this server's name among several: stream ids start with
                              str_NAME_ (default SDSTREAM_INSTANCE, or none)
  --params FILE_OR_JSON       default stream parameters, under each create body
  --settings FILE_OR_JSON     engine settings (device, dtype, vae, model_root, ...)
  --allow-model ID            serve this hub id besides the known models, as a base model,
                              ControlNet or LoRA (repeatable)
  --allow-private-network     let ip_adapter_style_image_url and output_rtmp_url reach
                              loopback and private addresses (a LAN set-up); link-local
                              ones stay refused
  --max-streams N             most streams at once; more are refused with 429 (default 8).
                              Below it, with frame_budget_ms in --settings, a stream that
                              would push the streams of its model and size past that budget
                              (by their measured costs) is refused with 429
                              STREAMS/NO_CAPACITY and the figures
  --input-timeout SECONDS     no frame for this long: DEGRADED_INPUT (default 3)
  --idle-timeout SECONDS      delete a stream with no publisher and no media for this long;
                              0: never (default 120)
  --ice-udp ADDR              local UDP address for ICE (default: the bind address's, port 0)
  --max-viewers N             most viewers per stream (default 32)
  --max-pending-viewers N     most viewers still connecting per stream (default 8)
  --connect-timeout SECONDS   a session must connect within this (default 10)
  --ice-mdns on|off           resolve peers' mDNS (.local) ICE candidates (default off: they
                              are ignored; clients still connect through the server's own)
  --bitrate BPS               the WHEP/HLS/RTMP encoder's bitrate (default 4000000)
  --ice-server URL[,USER,CREDENTIAL]
                              a STUN or TURN server for ICE, also handed to Scope-style
                              clients by GET /api/v1/webrtc/ice-servers (repeatable)
  --rtmp-bind ADDR|off        where to take RTMP publishes (rtmp://HOST:PORT/live/STREAM_KEY;
                              default: the bind address's host, port 1935; off: no RTMP)
  --rtmp-public-url URL       the RTMP URL clients publish to, without the key (default
                              rtmp://<public host>:<RTMP port>/live)
  --hls-segment-ms MS         HLS segment length (default 1000; 200 to 10000)
  --http-header-timeout SECONDS
                              a request's head must arrive within this (default 10)
  --http-idle-timeout SECONDS close a kept-alive connection idle this long (default 30)
  --http-write-timeout SECONDS
                              close a connection whose client reads nothing of its answer
                              for this long (default 30)
  --http-max-connections N    most HTTP connections at once (default 1024, at most half of
                              the descriptor limit); more are answered 503
  --scope-auth token|none     whether the Scope-style routes (/api/v1/...) need the API token
                              (default token; Daydream Scope's own server asks for none)
  --record DIR                record every stream's inputs, outputs and params (for replay)
  -h, --help                  this text";

/// The parsed `serve` flags.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ServeArgs {
    pub(crate) bind: SocketAddr,
    pub(crate) public_url: Option<String>,
    pub(crate) instance: Option<String>,
    pub(crate) params: Option<String>,
    pub(crate) settings: Option<String>,
    pub(crate) allow_models: Vec<String>,
    pub(crate) allow_private_network: bool,
    pub(crate) max_streams: usize,
    pub(crate) input_timeout: Duration,
    pub(crate) idle_timeout: Option<Duration>,
    pub(crate) ice_udp: Option<String>,
    pub(crate) max_viewers: usize,
    pub(crate) max_pending_viewers: usize,
    pub(crate) connect_timeout: Duration,
    pub(crate) ice_mdns: bool,
    pub(crate) bitrate: u32,
    pub(crate) ice_servers: Vec<IceServer>,
    /// `None`: no RTMP ingest; `Some(None)`: the default address.
    pub(crate) rtmp_bind: Option<Option<SocketAddr>>,
    pub(crate) rtmp_public_url: Option<String>,
    pub(crate) hls_segment: Duration,
    pub(crate) http: HttpConfig,
    pub(crate) scope_requires_token: bool,
    pub(crate) record: Option<PathBuf>,
}

/// What the command line asks for.
#[derive(Debug)]
pub(crate) enum Command {
    Help(&'static str),
    Version,
    Serve(Box<ServeArgs>),
    Run(Box<super::run::RunArgs>),
    Replay(Vec<String>),
}

/// Whether `name` can be an instance name: 1 to 63 of `[a-z0-9-]` (a DNS label, as pod names
/// are), so that it fits in a stream id and a URL path unescaped.
pub(crate) fn is_instance_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

pub(crate) fn parse(args: &[String], env_instance: Option<String>) -> Result<Command, String> {
    let Some((first, rest)) = args.split_first() else {
        return Err(USAGE.into());
    };
    match first.as_str() {
        "-h" | "--help" | "help" => Ok(Command::Help(USAGE)),
        "-V" | "--version" => Ok(Command::Version),
        "replay" => Ok(Command::Replay(rest.to_vec())),
        "run" => Ok(match super::run::parse(rest)? {
            Some(args) => Command::Run(Box::new(args)),
            None => Command::Help(super::run::USAGE),
        }),
        "serve" => parse_serve(rest, env_instance),
        other => Err(format!("unknown command {other:?}\n\n{USAGE}")),
    }
}

fn parse_serve(args: &[String], env_instance: Option<String>) -> Result<Command, String> {
    let mut parsed = ServeArgs {
        bind: SocketAddr::from(([127, 0, 0, 1], 8088)),
        public_url: None,
        instance: env_instance.filter(|i| !i.trim().is_empty()),
        params: None,
        settings: None,
        allow_models: Vec::new(),
        allow_private_network: false,
        max_streams: 8,
        input_timeout: Duration::from_secs(3),
        idle_timeout: Some(Duration::from_secs(120)),
        ice_udp: None,
        max_viewers: 32,
        max_pending_viewers: TransportConfig::default().max_pending_viewers,
        connect_timeout: TransportConfig::default().connect_timeout,
        ice_mdns: TransportConfig::default().resolve_mdns_candidates,
        bitrate: EncoderSettings::default().bitrate_bps,
        ice_servers: Vec::new(),
        rtmp_bind: Some(None),
        rtmp_public_url: None,
        hls_segment: HlsConfig::default().segment_target,
        http: HttpConfig::default(),
        scope_requires_token: true,
        record: None,
    };
    let split = split_flag_values(args);
    let mut it = split.iter();
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            return Ok(Command::Help(SERVE_USAGE));
        }
        // The one flag without a value.
        if flag == "--allow-private-network" {
            if args
                .iter()
                .any(|a| a.starts_with("--allow-private-network="))
            {
                return Err("--allow-private-network takes no value".into());
            }
            parsed.allow_private_network = true;
            continue;
        }
        let value = it
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n\n{SERVE_USAGE}"))?
            .clone();
        let number = |v: &str| v.parse::<u64>().map_err(|e| format!("{flag} {v}: {e}"));
        match flag.as_str() {
            "--bind" => {
                parsed.bind = value.parse().map_err(|e| format!("--bind {value}: {e}"))?;
            }
            "--public-url" => parsed.public_url = Some(value.trim_end_matches('/').to_owned()),
            "--instance" => {
                if !is_instance_name(&value) {
                    return Err(format!(
                        "--instance {value:?}: use 1 to 63 lowercase letters, digits and '-'"
                    ));
                }
                parsed.instance = Some(value);
            }
            "--params" => parsed.params = Some(value),
            "--settings" => parsed.settings = Some(value),
            "--allow-model" => parsed.allow_models.push(value),
            "--max-streams" => parsed.max_streams = number(&value)?.clamp(1, 10_000) as usize,
            "--input-timeout" => {
                parsed.input_timeout = Duration::from_secs(number(&value)?.clamp(1, 86_400));
            }
            "--idle-timeout" => {
                parsed.idle_timeout = match number(&value)? {
                    0 => None,
                    s => Some(Duration::from_secs(s.min(30 * 86_400))),
                };
            }
            "--ice-udp" => parsed.ice_udp = Some(value),
            "--max-viewers" => parsed.max_viewers = number(&value)?.clamp(1, 10_000) as usize,
            "--max-pending-viewers" => {
                parsed.max_pending_viewers = number(&value)?.clamp(1, 10_000) as usize;
            }
            "--connect-timeout" => {
                parsed.connect_timeout = Duration::from_secs(number(&value)?.clamp(1, 300));
            }
            "--ice-mdns" => {
                parsed.ice_mdns = match value.as_str() {
                    "on" => true,
                    "off" => false,
                    other => return Err(format!("--ice-mdns {other}: give on or off")),
                };
            }
            "--http-header-timeout" => {
                parsed.http.header_timeout = Duration::from_secs(number(&value)?.clamp(1, 300));
            }
            "--http-idle-timeout" => {
                parsed.http.idle_timeout = Duration::from_secs(number(&value)?.clamp(1, 3600));
            }
            "--http-write-timeout" => {
                parsed.http.write_timeout = Duration::from_secs(number(&value)?.clamp(1, 3600));
            }
            "--http-max-connections" => {
                parsed.http.max_connections = number(&value)?.clamp(1, 1 << 20) as usize;
            }
            "--bitrate" => parsed.bitrate = number(&value)?.clamp(50_000, 50_000_000) as u32,
            "--ice-server" => parsed
                .ice_servers
                .push(IceServer::parse(&value).map_err(|e| format!("--ice-server {e}"))?),
            "--rtmp-bind" => {
                parsed.rtmp_bind = if value == "off" {
                    None
                } else {
                    Some(Some(
                        value
                            .parse()
                            .map_err(|e| format!("--rtmp-bind {value}: {e} (or off)"))?,
                    ))
                };
            }
            "--rtmp-public-url" => {
                let url = value.trim_end_matches('/').to_owned();
                if !url.starts_with("rtmp://") {
                    return Err(format!("--rtmp-public-url {value}: give an rtmp:// URL"));
                }
                parsed.rtmp_public_url = Some(url);
            }
            "--hls-segment-ms" => {
                parsed.hls_segment = Duration::from_millis(number(&value)?.clamp(200, 10_000));
            }
            "--scope-auth" => {
                parsed.scope_requires_token = match value.as_str() {
                    "token" => true,
                    "none" => false,
                    other => return Err(format!("--scope-auth {other}: give token or none")),
                };
            }
            "--record" => parsed.record = Some(value.into()),
            other => return Err(format!("unknown flag {other}\n\n{SERVE_USAGE}")),
        }
    }
    if let Some(instance) = &parsed.instance
        && !is_instance_name(instance)
    {
        return Err(format!(
            "SDSTREAM_INSTANCE {instance:?}: use 1 to 63 lowercase letters, digits and '-'"
        ));
    }
    Ok(Command::Serve(Box::new(parsed)))
}

/// The settings the server's engines run with: `--settings`, model paths off (API clients name
/// the models), the `--allow-model` ids added to `allowed_models`. Asking for model paths is an
/// error rather than silently overridden.
pub(crate) fn served_settings(
    arg: Option<&str>,
    allow_models: &[String],
) -> Result<EngineSettings, String> {
    if let Some(v) = arg
        && json_arg(v)?.get("allow_model_paths") == Some(&Value::Bool(true))
    {
        return Err(
            "--settings: allow_model_paths cannot be true in the server (API clients \
                    would name folders on its disk); put models under model_root and list \
                    their ids with --allow-model"
                .into(),
        );
    }
    let mut settings = engine_settings(arg)?;
    settings.allow_model_paths = false;
    for id in allow_models {
        if !settings.is_allowed_model(id) {
            settings.allowed_models.push(id.clone());
        }
    }
    // The added ids are checked like the rest (hub ids only).
    settings
        .validate()
        .map_err(|e| format!("--allow-model: {e}"))?;
    Ok(settings)
}

/// The `--params` defaults must be valid under the served settings: a default that names a
/// model the server does not serve would fail every create.
pub(crate) fn check_default_params(
    defaults: &Value,
    settings: &EngineSettings,
) -> Result<(), String> {
    if !defaults.is_object() {
        return Err("--params must hold a JSON object".into());
    }
    StreamDiffusionParams::from_json_with(&defaults.to_string(), settings)
        .map(|_| ())
        .map_err(|e| format!("--params: {e}"))
}

/// The host part of an `http(s)://host[:port]/…` URL (brackets kept for IPv6).
fn url_host(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or(rest);
    match authority.rfind(':') {
        Some(i) if !authority[i..].contains(']') => &authority[..i],
        _ => authority,
    }
}

/// The server's configuration from the flags and the token; `local` is the address it
/// listens on (the default public URL and ICE address follow it), `rtmp_local` the RTMP
/// listener's, if any.
pub(crate) fn config(
    args: &ServeArgs,
    token: String,
    local: SocketAddr,
    rtmp_local: Option<SocketAddr>,
) -> Result<ServerConfig, String> {
    let mut settings = served_settings(args.settings.as_deref(), &args.allow_models)?;
    settings.allow_private_network |= args.allow_private_network;
    let default_params = match &args.params {
        Some(p) => json_arg(p)?,
        None => json!({}),
    };
    let ice_udp = args.ice_udp.clone().unwrap_or_else(|| {
        if local.ip().is_loopback() {
            format!("{}:0", local.ip())
        } else {
            "0.0.0.0:0".into()
        }
    });
    let transport = TransportConfig {
        udp_addrs: vec![ice_udp],
        max_viewers: args.max_viewers,
        max_pending_viewers: args.max_pending_viewers,
        connect_timeout: args.connect_timeout,
        resolve_mdns_candidates: args.ice_mdns,
        encoder: EncoderSettings {
            bitrate_bps: args.bitrate,
            ..EncoderSettings::default()
        },
        max_sdp_bytes: super::MAX_SDP_BYTES,
        ice_servers: args.ice_servers.clone(),
        ..TransportConfig::default()
    };
    let public_url = args
        .public_url
        .clone()
        .unwrap_or_else(|| format!("http://{local}"));
    let rtmp = crate::rtmp::RtmpConfig::default();
    let rtmp_url = rtmp_local.map(|addr| {
        args.rtmp_public_url.clone().unwrap_or_else(|| {
            format!(
                "rtmp://{}:{}/{}",
                url_host(&public_url),
                addr.port(),
                rtmp.app
            )
        })
    });
    Ok(ServerConfig {
        token,
        public_url,
        instance: args.instance.clone(),
        default_params,
        settings,
        transport,
        http: args.http.clone(),
        record: args.record.clone(),
        max_streams: args.max_streams,
        input_timeout: args.input_timeout,
        idle_timeout: args.idle_timeout,
        rtmp,
        rtmp_url,
        hls: HlsConfig {
            segment_target: args.hls_segment,
            ..HlsConfig::default()
        },
        scope_requires_token: args.scope_requires_token,
    })
}

/// Logs to stderr, filtered by `SDSTREAM_LOG`, else `RUST_LOG`, else `sdstream=info,warn`
/// (the library's rule, [`sdstream::log`]).
fn init_logs() {
    sdstream::log::to_stderr_unless_subscribed();
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM.
async fn stop_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => tracing::info!("SIGINT"),
        () = terminate => tracing::info!("SIGTERM"),
    }
}

async fn serve(args: ServeArgs) -> Result<(), String> {
    let token = match std::env::var("SDSTREAM_API_TOKEN") {
        Ok(t) if !t.trim().is_empty() => t.trim().to_owned(),
        _ => {
            let t = random_hex();
            eprintln!("SDSTREAM_API_TOKEN is not set; this run's API token: {t}");
            t
        }
    };
    let listener = tokio::net::TcpListener::bind(args.bind)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.bind))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    let rtmp_listener = match args.rtmp_bind {
        None => None,
        Some(bind) => {
            let bind = bind.unwrap_or_else(|| SocketAddr::new(local.ip(), 1935));
            Some(tokio::net::TcpListener::bind(bind).await.map_err(|e| {
                format!(
                    "cannot listen for RTMP on {bind}: {e}; give another address with \
                     --rtmp-bind ADDR, or --rtmp-bind off"
                )
            })?)
        }
    };
    let rtmp_local = match &rtmp_listener {
        Some(l) => Some(l.local_addr().map_err(|e| e.to_string())?),
        None => None,
    };
    let server = Server::new(config(&args, token, local, rtmp_local)?)?;
    let public_url = server.app().config().public_url.clone();
    // The first line on stdout, which scripts wait for.
    say(&format!("listening on {public_url}"));
    if let (Some(listener), Some(url)) = (rtmp_listener, server.app().config().rtmp_url.clone()) {
        server.start_rtmp(listener);
        tracing::info!(url = %url, "taking RTMP publishes");
    }
    let _ = std::io::stdout().flush();
    tracing::info!(url = %public_url, max_streams = args.max_streams, "serving");
    server
        .run(listener, stop_signal())
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!("stopped");
    Ok(())
}

/// Writes `text` to stdout; a closed stdout (`sdstream --help | head -1`) is no error.
fn say(text: &str) {
    let _ = writeln!(std::io::stdout(), "{text}");
}

/// The `sdstream` binary: `args` without the program name. Exits 0 on success, 1 when the
/// command failed, 2 for a command line it cannot use.
pub fn main(args: Vec<String>) -> ExitCode {
    let command = match parse(&args, std::env::var("SDSTREAM_INSTANCE").ok()) {
        Ok(command) => command,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let result = match command {
        Command::Help(text) => {
            say(text);
            Ok(())
        }
        Command::Version => {
            say(&format!("sdstream {}", env!("CARGO_PKG_VERSION")));
            Ok(())
        }
        Command::Replay(rest) => super::replay::run(&rest),
        Command::Run(args) => {
            init_logs();
            super::run::run(&args)
        }
        Command::Serve(args) => {
            init_logs();
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .worker_threads(4)
                .build()
                .map_err(|e| format!("cannot start the async runtime: {e}"))
                .and_then(|runtime| runtime.block_on(serve(*args)))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// The arguments with `--flag=value` split into `--flag value`, so that both forms read alike.
pub(crate) fn split_flag_values(args: &[String]) -> Vec<String> {
    args.iter()
        .flat_map(|arg| match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => {
                vec![flag.to_owned(), value.to_owned()]
            }
            _ => vec![arg.clone()],
        })
        .collect()
}
