//! A throwaway PostgreSQL cluster for tests: `initdb` into a temporary directory, a free port on
//! 127.0.0.1, a database and a password-authenticated superuser, stopped and removed on drop.
//!
//! PostgreSQL's programs come from `TOLLGATE_PG_BIN` (a directory holding `initdb`, `pg_ctl`,
//! `postgres` and `psql`), else the newest `/usr/lib/postgresql/*/bin` (Debian's layout). PostgreSQL
//! refuses to run as root: when the tests run as root (CI does), every PostgreSQL program runs as the
//! `postgres` user (created by Debian's `postgresql` package) through `runuser`, and the cluster's
//! directory is given to that user.
//!
//! Authentication: TCP connections (what Tollgate uses) need the password (SCRAM-SHA-256); the Unix
//! socket in the cluster's directory is trusted, which [`PgCluster::psql`] uses to look inside.
//!
//! API (kept small; the fleet tests use it too): [`PgCluster::start`] / [`PgCluster::start_tls`],
//! [`PgCluster::url`] (what `[ledger] postgres` takes), [`PgCluster::psql`], [`PgCluster::pid`],
//! [`PgCluster::pause`] / [`PgCluster::resume`] (SIGSTOP / SIGCONT every process of the cluster: a
//! server that stops answering while the kernel still accepts and acknowledges), and
//! [`PgCluster::stop`] / [`PgCluster::start_again`] (a restart on the same port and data).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::TempDir;

/// The superuser the harness creates, its password, and the database.
pub const USER: &str = "tollgate";
pub const PASSWORD: &str = "pg-test-Secret-7f3a";
pub const DATABASE: &str = "tollgate";

/// The directory of PostgreSQL's programs, if this machine has one: `TOLLGATE_PG_BIN`, else the newest
/// `/usr/lib/postgresql/*/bin`.
pub fn bin_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("TOLLGATE_PG_BIN").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, b)| b)
}

/// TLS material of a cluster started with [`PgCluster::start_tls`].
pub struct Tls {
    /// The CA that signed the server's certificate (names `localhost` and `127.0.0.1`), PEM.
    pub ca_file: PathBuf,
    /// Another CA, which did not: for the wrong-CA check.
    pub wrong_ca_file: PathBuf,
}

/// A running throwaway cluster; stopped (`pg_ctl stop -m immediate`) and deleted on drop.
pub struct PgCluster {
    dir: TempDir,
    bin: PathBuf,
    port: u16,
    /// `Some("postgres")` when the tests run as root.
    run_as: Option<String>,
    pub tls: Option<Tls>,
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl PgCluster {
    /// A cluster without TLS (URLs say `sslmode=disable`).
    pub fn start() -> PgCluster {
        PgCluster::create(false)
    }

    /// A cluster with `ssl = on`, its certificate signed by a CA of its own ([`PgCluster::tls`]).
    pub fn start_tls() -> PgCluster {
        PgCluster::create(true)
    }

    fn create(tls: bool) -> PgCluster {
        let bin = bin_dir().expect(
            "no PostgreSQL: set TOLLGATE_PG_BIN to its bin directory (apt-get install postgresql)",
        );
        let run_as = is_root().then(|| "postgres".to_owned());
        let dir = TempDir::new("pg");
        let data = dir.0.join("data");
        let mut cluster = PgCluster {
            dir,
            bin,
            port: 0,
            run_as,
            tls: None,
        };
        let pwfile = cluster.dir.file("pwfile", PASSWORD);
        cluster.give(&cluster.dir.0);
        cluster.give(&pwfile);
        let out = cluster.run(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                USER,
                "--pwfile",
                pwfile.to_str().unwrap(),
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        assert!(out.status.success(), "initdb failed: {}", text(&out));
        if tls {
            cluster.tls = Some(cluster.write_certificates(&data));
        }
        // A port taken between choosing it and binding it: try another.
        for attempt in 0..5 {
            cluster.port = free_port();
            if cluster.pg_ctl_start() {
                break;
            }
            assert!(attempt < 4, "the cluster did not start: {}", cluster.log());
        }
        cluster.psql_db("postgres", &format!("CREATE DATABASE {DATABASE}"));
        cluster
    }

    /// Gives `path` to the user PostgreSQL runs as.
    fn give(&self, path: &Path) {
        if let Some(user) = &self.run_as {
            let st = Command::new("chown").arg(user).arg(path).status().unwrap();
            assert!(st.success(), "chown {user} {}", path.display());
        }
    }

    /// Runs one of PostgreSQL's programs (as `postgres` when root).
    fn run(&self, program: &str, args: &[&str]) -> Output {
        let path = self.bin.join(program);
        let mut cmd = match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&path);
                c
            }
            None => Command::new(&path),
        };
        cmd.args(args)
            .current_dir(&self.dir.0)
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", path.display()))
    }

    fn write_certificates(&self, data: &Path) -> Tls {
        let ca = |name: &str| {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            let cert = params.self_signed(&key).unwrap();
            (cert, key)
        };
        let (ca_cert, ca_key) = ca("tollgate test CA");
        let (wrong_cert, _) = ca("another CA");
        let key = rcgen::KeyPair::generate().unwrap();
        let leaf =
            rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .unwrap()
                .signed_by(&key, &ca_cert, &ca_key)
                .unwrap();
        let server_crt = data.join("server.crt");
        let server_key = data.join("server.key");
        std::fs::write(&server_crt, leaf.pem()).unwrap();
        std::fs::write(&server_key, key.serialize_pem()).unwrap();
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&server_key, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        self.give(&server_crt);
        self.give(&server_key);
        let conf = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).unwrap();
        text.push_str("\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        std::fs::write(&conf, text).unwrap();
        Tls {
            ca_file: self.dir.file("ca.pem", &ca_cert.pem()),
            wrong_ca_file: self.dir.file("wrong-ca.pem", &wrong_cert.pem()),
        }
    }

    fn data(&self) -> PathBuf {
        self.dir.0.join("data")
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("log")).unwrap_or_default()
    }

    fn pg_ctl_start(&self) -> bool {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            self.dir.0.display()
        );
        let data = self.data();
        let log = self.dir.0.join("log");
        let out = self.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-o",
                &opts,
                "-l",
                log.to_str().unwrap(),
                "-w",
                "-t",
                "30",
                "start",
            ],
        );
        out.status.success()
    }

    /// The port the cluster listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://tollgate:PASSWORD@127.0.0.1:PORT/tollgate?sslmode=...`: `disable`, or with
    /// [`PgCluster::start_tls`] `verify-full` (give [`Tls::ca_file`] as `ledger.postgres_ca_file`).
    pub fn url(&self) -> String {
        let mode = if self.tls.is_some() {
            "verify-full"
        } else {
            "disable"
        };
        self.url_with(&format!("sslmode={mode}"))
    }

    /// [`PgCluster::url`] with other query parameters.
    pub fn url_with(&self, query: &str) -> String {
        format!(
            "postgres://{USER}:{PASSWORD}@127.0.0.1:{}/{DATABASE}?{query}",
            self.port
        )
    }

    /// Runs `sql` with `psql` over the trusted Unix socket in database `tollgate`; returns its output
    /// (unaligned, tuples only: one row per line, columns separated by `|`). Panics on an SQL error.
    pub fn psql(&self, sql: &str) -> String {
        self.psql_db(DATABASE, sql)
    }

    fn psql_db(&self, db: &str, sql: &str) -> String {
        let port = self.port.to_string();
        let host = self.dir.0.display().to_string();
        let out = self.run(
            "psql",
            &[
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                &host,
                "-p",
                &port,
                "-U",
                USER,
                "-d",
                db,
                "-c",
                sql,
            ],
        );
        assert!(out.status.success(), "psql {sql:?}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// The postmaster's process id.
    pub fn pid(&self) -> u32 {
        let pidfile = std::fs::read_to_string(self.data().join("postmaster.pid")).unwrap();
        pidfile.lines().next().unwrap().trim().parse().unwrap()
    }

    /// The postmaster and every process it started (the backends serving connections, and its helpers).
    fn pids(&self) -> Vec<u32> {
        let root = self.pid();
        let mut out = vec![root];
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
                continue;
            };
            // `pid (comm) state ppid ...`; comm may hold spaces, so read after the last ')'.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if ppid == Some(root) {
                out.push(pid);
            }
        }
        out
    }

    fn signal(&self, sig: &str, pids: &[u32]) {
        for pid in pids {
            let _ = Command::new("kill").args([sig, &pid.to_string()]).status();
        }
    }

    /// SIGSTOPs the cluster (the postmaster first, so it starts no one, then its processes): the kernel
    /// still accepts connections and acknowledges what is sent, but nothing answers.
    pub fn pause(&self) {
        let pids = self.pids();
        self.signal("-STOP", &pids);
    }

    /// SIGCONTs every process [`PgCluster::pause`] stopped.
    pub fn resume(&self) {
        let mut pids = self.pids();
        pids.reverse();
        self.signal("-CONT", &pids);
    }

    /// Stops the server (`pg_ctl stop -m fast`: connections are closed, committed data kept).
    pub fn stop(&self) {
        let data = self.data();
        let out = self.run(
            "pg_ctl",
            &["-D", data.to_str().unwrap(), "-m", "fast", "-w", "stop"],
        );
        assert!(out.status.success(), "pg_ctl stop: {}", text(&out));
    }

    /// Starts the server again on the same port and data.
    pub fn start_again(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.pg_ctl_start() {
            assert!(
                Instant::now() < deadline,
                "the cluster did not start again: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        // A paused cluster ignores everything but SIGKILL and SIGCONT: resume it first.
        if self.data().join("postmaster.pid").is_file() {
            self.resume();
            let data = self.data();
            let _ = self.run(
                "pg_ctl",
                &[
                    "-D",
                    data.to_str().unwrap(),
                    "-m",
                    "immediate",
                    "-w",
                    "stop",
                ],
            );
        }
    }
}
