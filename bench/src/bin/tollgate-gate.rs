//! `tollgate-gate`: the tail-latency release gate.
//!
//! Starts the mock provider, a Tollgate gateway in front of it (and nginx and HAProxy as plain reverse
//! proxies when they are installed and `--peers` allows), then runs the same open-loop load (same rate,
//! connections and payload) against each target, in rotating order, `repeats` times; then a closed-loop run
//! per target for the throughput ceiling. Reports what each proxy adds to direct-to-mock latency (medians over
//! repeats of the per-repeat difference), the gateway's CPU time per request from `/proc`, and exits 1 when
//! Tollgate exceeds a threshold in `bench/gate.toml`.

#![forbid(unsafe_code)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use tollgate_bench::gate::{summarise, verdict, GateConfig, Sample, Summary, SATURATION};
use tollgate_loadtest::load::{self, LoadConfig, Mode, Payload};
use tollgate_tests::{bin, service_token, Proc, TempDir};

#[derive(Parser)]
#[command(
    name = "tollgate-gate",
    about = "Tail-latency release gate: Tollgate vs direct (and nginx, HAProxy)"
)]
struct Cli {
    /// The gate file (thresholds, rates, durations).
    #[arg(long, default_value = "bench/gate.toml")]
    config: PathBuf,
    /// Use the file's [quick] section (CI).
    #[arg(long)]
    quick: bool,
    /// Peers to compare with: auto (those installed), none, or all (fail if missing).
    #[arg(long, default_value = "auto")]
    peers: String,
    /// Write the full report (samples and summaries) as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Measure and report, but never fail (for exploring).
    #[arg(long)]
    no_fail: bool,
    /// Override every scenario's rates (comma-separated), e.g. for a latency-vs-rate sweep.
    #[arg(long, value_delimiter = ',')]
    rates: Vec<f64>,
    /// Run only these scenarios (repeatable).
    #[arg(long)]
    scenario: Vec<String>,
}

/// Something load is sent to.
struct Target {
    name: &'static str,
    addr: SocketAddr,
    /// The process whose CPU time is charged to this target's requests.
    pid: Option<u32>,
}

/// A peer proxy process (nginx, HAProxy), killed on drop.
struct PeerProc(Child);

impl Drop for PeerProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_listening(addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("nothing listening on {addr} after 10 s")
}

fn which(cmd: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(cmd))
        .find(|p| p.is_file())
}

/// nginx as a plain reverse proxy: one worker, no master, upstream keep-alive, no buffering (SSE-fair).
fn start_nginx(dir: &TempDir, mock: SocketAddr) -> anyhow::Result<(PeerProc, SocketAddr)> {
    let exe = which("nginx").context("nginx is not installed")?;
    let port = free_port()?;
    let d = dir.0.display();
    let conf = format!(
        r#"daemon off;
master_process off;
worker_processes 1;
error_log {d}/nginx-error.log error;
pid {d}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    upstream mock {{ server {mock}; keepalive 256; }}
    server {{
        listen 127.0.0.1:{port};
        keepalive_requests 1000000;
        location / {{
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
        }}
    }}
}}
"#
    );
    let path = dir.file("nginx.conf", &conf);
    let child = Command::new(exe)
        .args(["-p", &d.to_string(), "-c"])
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting nginx")?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let p = PeerProc(child);
    wait_listening(addr)?;
    Ok((p, addr))
}

/// HAProxy as a plain reverse proxy: one thread, server keep-alive, `http-no-delay` (else it holds SSE back).
fn start_haproxy(dir: &TempDir, mock: SocketAddr) -> anyhow::Result<(PeerProc, SocketAddr)> {
    let exe = which("haproxy").context("haproxy is not installed")?;
    let port = free_port()?;
    let conf = format!(
        r#"global
    nbthread 1
    maxconn 4000
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    option http-keep-alive
    option http-no-delay
frontend fe
    bind 127.0.0.1:{port}
    default_backend be
backend be
    http-reuse always
    server mock {mock}
"#
    );
    let path = dir.file("haproxy.cfg", &conf);
    let child = Command::new(exe)
        .args(["-db", "-f"])
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting haproxy")?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let p = PeerProc(child);
    wait_listening(addr)?;
    Ok((p, addr))
}

/// utime + stime of a process, in microseconds.
fn cpu_us(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15 (1-based).
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks * 1_000_000.0 / clock_ticks())
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

fn payload(name: &str) -> anyhow::Result<Payload> {
    Ok(match name {
        "openai" => Payload::OpenAi,
        "openai-stream" => Payload::OpenAiStream,
        "anthropic" => Payload::Anthropic,
        "anthropic-stream" => Payload::AnthropicStream,
        other => bail!("unknown payload {other}"),
    })
}

fn measure(
    cfg: &GateConfig,
    t: &Target,
    p: &str,
    mode: Mode,
    duration_s: f64,
    token: &str,
) -> anyhow::Result<(load::LoadReport, Option<f64>)> {
    let mut lc = LoadConfig::new(t.addr, payload(p)?);
    // Every target gets the same bytes; Tollgate verifies the service token (its identify phase is part of
    // what the gate measures), the others pass it along or ignore it.
    lc.headers
        .push(("authorization".into(), format!("Bearer {token}")));
    lc.connections = cfg.connections;
    lc.mode = mode;
    lc.duration = Duration::from_secs_f64(duration_s);
    lc.warmup = Duration::from_secs_f64(cfg.warmup_s);
    lc.progress = false;
    // No busy-wait pacing: on a 2-core machine the spin would take CPU from the proxy being measured. Every
    // target pays the same ~15 us of send lag, which the added-latency figures cancel out.
    lc.spin = Duration::ZERO;
    // The CPU delta covers the warm-up too, while the report counts measured requests only; at a constant rate
    // the warm-up's requests are in proportion to its length, so scale the count to the whole run.
    let before = t.pid.and_then(cpu_us);
    let report = load::run(&lc).with_context(|| format!("load against {}", t.name))?;
    let after = t.pid.and_then(cpu_us);
    let total_requests = report.requests as f64 * (duration_s + cfg.warmup_s) / duration_s;
    let cpu = match (before, after) {
        (Some(b), Some(a)) if total_requests > 0.0 => Some((a - b) / total_requests),
        _ => None,
    };
    Ok((report, cpu))
}

fn target_errors(r: &load::LoadReport) -> u64 {
    r.errors
        .iter()
        .filter(|(kind, _)| kind.as_str() != "unsent")
        .map(|(_, n)| n)
        .sum()
}

/// One load run's figures (`rate` 0: a closed-loop run).
fn sample(
    scenario: &str,
    rate: f64,
    repeat: usize,
    t: &Target,
    r: &load::LoadReport,
    cpu: Option<f64>,
) -> Sample {
    Sample {
        scenario: scenario.to_owned(),
        rate,
        repeat,
        target: t.name.to_owned(),
        p50_us: q(&r.ttlb, 0.50),
        p99_us: q(&r.ttlb, 0.99),
        p999_us: q(&r.ttlb, 0.999),
        ttfb_p50_us: q(&r.ttfb, 0.50),
        achieved_rate: r.achieved_rate,
        requests: r.requests,
        // `unsent` is the load generator falling behind (a stalled machine), not the target failing; every
        // other kind (connect, reset, timeout, status) is the target's.
        errors: target_errors(r),
        events: r.events,
        cpu_us_per_request: cpu,
    }
}

fn q(h: &hdrhistogram::Histogram<u64>, p: f64) -> f64 {
    h.value_at_quantile(p) as f64 / 1000.0
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("tollgate-gate: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run() -> anyhow::Result<bool> {
    let cli = Cli::parse();
    let mut cfg = GateConfig::load(&cli.config, cli.quick).map_err(anyhow::Error::msg)?;
    if !cli.scenario.is_empty() {
        cfg.scenarios.retain(|s| cli.scenario.contains(&s.name));
        if cfg.scenarios.is_empty() {
            bail!(
                "no scenario named {:?} in {}",
                cli.scenario,
                cli.config.display()
            );
        }
    }
    if !cli.rates.is_empty() {
        for s in &mut cfg.scenarios {
            s.rates = cli.rates.clone();
        }
    }
    let dir = TempDir::new("gate");

    let mock = Proc::start(
        &bin("tollgate-mock"),
        &["--listen", "127.0.0.1:0", "--threads", "1", "--no-record"],
        &[],
    );
    // Requests carry a service token, as a deployment's would, and three budgets apply to each.
    let store = dir.0.join("store");
    let token = service_token(&store, "bench");
    let gw_conf = dir.file(
        "tollgate.toml",
        &format!(
            r#"[server]
listen = ["127.0.0.1:0"]
workers = {workers}
# The control plane listens as in a deployment (idle here), on a port of its own.
[admin]
listen = "127.0.0.1:0"
[store]
dir = "{store}"
[[providers]]
name = "openai"
kind = "openai"
base_url = "http://{mock}"
[[providers]]
name = "anthropic"
kind = "anthropic"
base_url = "http://{mock}"
[[routes]]
model = "gpt-*"
provider = "openai"
[[routes]]
model = "claude-*"
provider = "anthropic"
# Budgets in the path, as a deployment's would be (never exhausted here): every request reserves on three
# instances, settles, journals and reaches the ledger thread, whose work counts in the CPU per request.
[[budgets]]
name = "per-caller"
amount_usd = "1000000"
window = "day"
scope = "each_identity"
[[budgets]]
name = "team"
amount_usd = "1000000"
window = "month"
scope = "group"
group = "bench"
[[budgets]]
name = "everyone"
amount_usd = "10000000"
window = "7d"
scope = "everyone"
"#,
            workers = cfg.gateway_workers,
            store = store.display(),
            mock = mock.addr
        ),
    );
    let gateway = Proc::start(
        &bin("tollgate"),
        &["serve", "--config", &gw_conf.to_string_lossy()],
        &[],
    );

    let mut targets = vec![
        Target {
            name: "direct",
            addr: mock.addr,
            pid: None,
        },
        Target {
            name: "tollgate",
            addr: gateway.addr,
            pid: Some(gateway.child.id()),
        },
    ];
    let mut peers = Vec::new();
    if cli.peers != "none" {
        for (name, start) in [
            (
                "nginx",
                start_nginx as fn(&TempDir, SocketAddr) -> anyhow::Result<(PeerProc, SocketAddr)>,
            ),
            ("haproxy", start_haproxy),
        ] {
            match start(&dir, mock.addr) {
                Ok((p, addr)) => {
                    targets.push(Target {
                        name,
                        addr,
                        pid: Some(p.0.id()),
                    });
                    peers.push(p);
                }
                Err(e) if cli.peers == "all" => return Err(e),
                Err(e) => eprintln!("peer {name} skipped: {e:#}"),
            }
        }
    }
    eprintln!(
        "gate: {} targets ({}), {} connections, {} s x {} repeats{}",
        targets.len(),
        targets
            .iter()
            .map(|t| t.name)
            .collect::<Vec<_>>()
            .join(", "),
        cfg.connections,
        cfg.duration_s,
        cfg.repeats,
        if cli.quick { " (quick)" } else { "" }
    );

    let mut samples: Vec<Sample> = Vec::new();
    for sc in &cfg.scenarios {
        for &rate in &sc.rates {
            for repeat in 0..cfg.repeats {
                let n = targets.len();
                for k in 0..n {
                    let t = &targets[(k + repeat) % n];
                    let (r, cpu) = measure(
                        &cfg,
                        t,
                        &sc.payload,
                        Mode::Open { rate },
                        cfg.duration_s,
                        &token,
                    )?;
                    let s = sample(&sc.name, rate, repeat, t, &r, cpu);
                    eprintln!(
                        "  {:<7} {:>6} req/s  rep {}  {:<8} p50 {:>8.1} us  p99 {:>8.1} us  p99.9 {:>8.1} us{}{}",
                        s.scenario,
                        rate,
                        repeat,
                        s.target,
                        s.p50_us,
                        s.p99_us,
                        s.p999_us,
                        s.cpu_us_per_request.map(|c| format!("  cpu {c:.1} us/req")).unwrap_or_default(),
                        if s.errors > 0 { format!("  ERRORS {}", s.errors) } else { String::new() }
                    );
                    samples.push(s);
                }
            }
        }
    }

    // Saturation: closed loop on the first scenario's payload, `repeats` times in rotating order like the
    // open-loop runs, so each repeat's CPU per request and throughput are compared with the peers' of the
    // same repeat (the gate's ratio limits).
    let mut ceilings = Vec::new();
    if let Some(sc) = cfg.scenarios.first() {
        for repeat in 0..cfg.repeats {
            let n = targets.len();
            for k in 0..n {
                let t = &targets[(k + repeat) % n];
                let (r, cpu) = measure(&cfg, t, &sc.payload, Mode::Closed, cfg.ceiling_s, &token)?;
                eprintln!(
                    "  saturation {:>9.0} req/s  rep {}  {:<8}{}",
                    r.achieved_rate,
                    repeat,
                    t.name,
                    cpu.map(|c| format!("  cpu {c:.1} us/req"))
                        .unwrap_or_default()
                );
                ceilings.push(serde_json::json!({
                    "target": t.name, "scenario": sc.name, "repeat": repeat, "achieved_rate": r.achieved_rate,
                    "cpu_us_per_request": cpu, "errors": r.error_count(),
                }));
                samples.push(sample(SATURATION, 0.0, repeat, t, &r, cpu));
            }
        }
    }

    let summaries = summarise(&samples);
    print_table(&summaries);
    let failures = verdict(&summaries, &cfg.thresholds);
    if let Some(path) = &cli.json {
        let report = serde_json::json!({
            "config": cli.config, "quick": cli.quick, "connections": cfg.connections,
            "duration_s": cfg.duration_s, "repeats": cfg.repeats, "gateway_workers": cfg.gateway_workers,
            "samples": samples, "summaries": summaries, "ceilings": ceilings, "failures": failures,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    drop(peers);
    drop(gateway);
    drop(mock);
    if failures.is_empty() {
        println!("gate: PASS");
        Ok(true)
    } else {
        for f in &failures {
            println!("gate: FAIL: {f}");
        }
        Ok(cli.no_fail)
    }
}

fn print_table(s: &[Summary]) {
    println!(
        "\n{:<10} {:>7} {:<9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "scenario",
        "rate",
        "target",
        "req/s",
        "p50 us",
        "p99 us",
        "p99.9 us",
        "+p50 us",
        "+p99 us",
        "+p99.9 us",
        "cpu/req",
        "cpu/evt",
        "cpu/peer",
        "rps/peer"
    );
    let f = |v: Option<f64>| v.map(|x| format!("{x:.1}")).unwrap_or_else(|| "-".into());
    let r2 = |v: Option<f64>| v.map(|x| format!("{x:.2}x")).unwrap_or_else(|| "-".into());
    for r in s {
        println!(
            "{:<10} {:>7} {:<9} {:>9.0} {:>9.1} {:>9.1} {:>9.1} {:>9} {:>9} {:>10} {:>9} {:>9} {:>9} {:>9}",
            r.scenario,
            if r.rate > 0.0 { r.rate.to_string() } else { "closed".to_owned() },
            r.target,
            r.achieved_rate,
            r.p50_us,
            r.p99_us,
            r.p999_us,
            f(r.added_p50_us),
            f(r.added_p99_us),
            f(r.added_p999_us),
            f(r.cpu_us_per_request),
            f(r.cpu_us_per_event),
            r2(r.peer_ratio_cpu),
            r2(r.peer_ratio_rate)
        );
    }
}
