//! Stamps the binary with the git commit it was built from, for `tollgate --version`.
//!
//! Fails soft: outside a git checkout (a source tarball) the commit reads "unknown". It names HEAD only:
//! uncommitted edits are not marked (cargo would have to re-run this on every file change to know).

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn main() {
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=TOLLGATE_GIT_COMMIT={commit}");
    // Re-stamp when HEAD moves (a commit, a checkout, a rebase).
    if let Some(dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        println!("cargo:rerun-if-changed={dir}/HEAD");
        if let Some(r) = git(&["symbolic-ref", "-q", "HEAD"]) {
            println!("cargo:rerun-if-changed={dir}/{r}");
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
}
