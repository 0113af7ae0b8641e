//! The tree keeps the architecture: no module imports another that imports it back (directly or around a
//! longer circle), and no two library modules share a file name for different things.
//!
//! Reads the sources as text (no compiler plug-in, no extra crate): every `use crate::`, `use super::`,
//! `use self::` tree and every inline `crate::a::b` / `super::x` / `child::` path in code outside comments and
//! `#[cfg(test)]` modules is resolved to the module file it names (following `pub use` re-exports), and the
//! graph of module files is checked for strongly connected components. A parent module is not exempt: a
//! phase that imports the context from `pipeline/mod.rs` while `mod.rs` calls the phase is a circle, so
//! shared types live in their own file (`pipeline/ctx.rs`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Module = Vec<String>;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Library crates whose module graphs are checked (binaries are roots of their own and import the libraries).
const CRATES: &[&str] = &[
    "controlplane/core/src",
    "controlplane/server/src",
    "dataplane/src",
];

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            if p.file_name().is_some_and(|n| n != "bin") {
                rs_files(&p, out);
            }
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

fn module_of(src: &Path, file: &Path) -> Module {
    let rel = file.strip_prefix(src).unwrap();
    let mut parts: Vec<String> = rel
        .iter()
        .map(|s| s.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().unwrap();
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" && stem != "lib" {
        parts.push(stem.to_string());
    }
    parts
}

/// The code of a file without comments, string literals and its `#[cfg(test)]` modules.
fn code_of(text: &str) -> String {
    let mut out = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let t = line.trim_start();
        if t.starts_with("#[cfg(test)]") {
            // Skip the attribute and the item it gates: a `mod ... { ... }` block or a one-line item.
            let mut depth = 0i32;
            let mut opened = false;
            for l in lines.by_ref() {
                for c in l.chars() {
                    match c {
                        '{' => {
                            depth += 1;
                            opened = true;
                        }
                        '}' => depth -= 1,
                        _ => {}
                    }
                }
                if (opened && depth <= 0) || (!opened && l.trim_end().ends_with(';')) {
                    break;
                }
            }
            continue;
        }
        if t.starts_with("//") {
            continue;
        }
        // Drop string literals and trailing comments (good enough for paths: no path lives in a string).
        let mut s = String::new();
        let mut in_str = false;
        let mut prev = ' ';
        let mut chars = line.chars().peekable();
        while let Some(c) = chars.next() {
            if in_str {
                if c == '"' && prev != '\\' {
                    in_str = false;
                }
            } else if c == '"' {
                in_str = true;
            } else if c == '/' && chars.peek() == Some(&'/') {
                break;
            } else {
                s.push(c);
            }
            prev = if prev == '\\' && c == '\\' { ' ' } else { c };
        }
        out.push_str(&s);
        out.push('\n');
    }
    out
}

/// Expands `a::{b, c::{d, e}}` into full paths.
fn expand(tree: &str) -> Vec<String> {
    // `a as b` becomes `a@b`; every other space goes.
    let tree = tree
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace(" as ", "@")
        .replace(' ', "");
    let Some(open) = tree.find('{') else {
        return vec![tree];
    };
    let prefix = &tree[..open];
    let inner = &tree[open + 1..tree.len() - 1];
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[start..]);
    parts
        .into_iter()
        .filter(|p| !p.is_empty())
        .flat_map(|p| expand(p).into_iter().map(move |q| format!("{prefix}{q}")))
        .collect()
}

struct Crate {
    modules: BTreeSet<Module>,
    /// Per module: the paths it names (unresolved), and `pub use` re-exports (name -> path).
    refs: BTreeMap<Module, Vec<String>>,
    reexports: BTreeMap<Module, BTreeMap<String, String>>,
    children: BTreeMap<Module, BTreeSet<String>>,
}

fn path_chars(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

fn read_crate(src: &Path) -> Crate {
    let mut files = Vec::new();
    rs_files(src, &mut files);
    let mut c = Crate {
        modules: BTreeSet::new(),
        refs: BTreeMap::new(),
        reexports: BTreeMap::new(),
        children: BTreeMap::new(),
    };
    for f in &files {
        let m = module_of(src, f);
        c.modules.insert(m.clone());
        let code = code_of(&std::fs::read_to_string(f).unwrap());
        let mut refs = Vec::new();
        let mut rex = BTreeMap::new();
        let mut kids = BTreeSet::new();
        // `use` trees (possibly over several lines).
        let mut rest = code.as_str();
        while let Some(i) = rest.find("use ") {
            let before = rest[..i].chars().last();
            let stmt_end = rest[i..].find(';').map(|j| i + j);
            let Some(end) = stmt_end else { break };
            if before.is_none_or(|b| !path_chars(b)) {
                let public =
                    rest[..i].trim_end().ends_with("pub") || rest[..i].trim_end().ends_with(')');
                for p in expand(&rest[i + 4..end]) {
                    let (p, alias) = match p.split_once('@') {
                        Some((p, a)) => (p.to_string(), Some(a.to_string())),
                        None => (p, None),
                    };
                    let p = p.trim_end_matches("::self").to_string();
                    if public {
                        let name = alias
                            .unwrap_or_else(|| p.rsplit("::").next().unwrap_or("").to_string());
                        rex.insert(name, p.clone());
                    }
                    refs.push(p);
                }
            }
            rest = &rest[end + 1..];
        }
        // `mod child;` declarations.
        for line in code.lines() {
            let t = line.trim();
            let t = t.strip_prefix("pub ").unwrap_or(t);
            if let Some(name) = t.strip_prefix("mod ").and_then(|r| r.strip_suffix(';')) {
                kids.insert(name.trim().to_string());
            }
        }
        // Inline paths: crate::, super::, self:: and child modules.
        let bytes: Vec<char> = code.chars().collect();
        let mut i = 0;
        while i < bytes.len() {
            if path_chars(bytes[i]) && (i == 0 || !path_chars(bytes[i - 1])) {
                let start = i;
                while i < bytes.len() && path_chars(bytes[i]) {
                    i += 1;
                }
                let word: String = bytes[start..i].iter().collect();
                let head = word.split("::").next().unwrap_or("");
                if word.contains("::")
                    && (matches!(head, "crate" | "super" | "self") || kids.contains(head))
                {
                    refs.push(word);
                }
            } else {
                i += 1;
            }
        }
        c.refs.insert(m.clone(), refs);
        c.reexports.insert(m.clone(), rex);
        c.children.insert(m, kids);
    }
    c
}

impl Crate {
    /// The module file a path names, seen from `from`; `None` for paths outside the crate.
    fn resolve(&self, from: &Module, path: &str, hops: usize) -> Option<Module> {
        let segs: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
        let mut base: Module;
        let mut k = 0;
        match segs.first()? {
            &"crate" => {
                base = vec![];
                k = 1;
            }
            &"super" | &"self" => {
                base = from.clone();
                while k < segs.len() && (segs[k] == "super" || segs[k] == "self") {
                    if segs[k] == "super" {
                        base.pop();
                    }
                    k += 1;
                }
            }
            s if self.children.get(from).is_some_and(|c| c.contains(*s)) => {
                base = from.clone();
            }
            _ => return None,
        }
        while k < segs.len() {
            let mut next = base.clone();
            next.push(segs[k].to_string());
            if self.modules.contains(&next) {
                base = next;
                k += 1;
                continue;
            }
            // An item re-exported by `base` lives in the module it comes from.
            if hops < 4 {
                if let Some(target) = self.reexports.get(&base).and_then(|r| r.get(segs[k])) {
                    if let Some(t) = self.resolve(&base, target, hops + 1) {
                        return Some(t);
                    }
                }
            }
            break;
        }
        Some(base)
    }

    fn edges(&self) -> BTreeMap<Module, BTreeSet<Module>> {
        let mut g: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
        for (m, refs) in &self.refs {
            let out = g.entry(m.clone()).or_default();
            for r in refs {
                if let Some(t) = self.resolve(m, r, 0) {
                    // The crate root (lib.rs) wires everything together; naming it is not a layer edge.
                    if &t != m && !t.is_empty() {
                        out.insert(t);
                    }
                }
            }
        }
        g
    }
}

/// Strongly connected components with more than one module (Tarjan).
fn cycles(g: &BTreeMap<Module, BTreeSet<Module>>) -> Vec<Vec<Module>> {
    struct T<'a> {
        g: &'a BTreeMap<Module, BTreeSet<Module>>,
        index: BTreeMap<&'a Module, usize>,
        low: BTreeMap<&'a Module, usize>,
        stack: Vec<&'a Module>,
        on: BTreeSet<&'a Module>,
        next: usize,
        out: Vec<Vec<Module>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a Module) {
        t.index.insert(v, t.next);
        t.low.insert(v, t.next);
        t.next += 1;
        t.stack.push(v);
        t.on.insert(v);
        if let Some(ws) = t.g.get(v) {
            for w in ws {
                let Some((w, _)) = t.g.get_key_value(w) else {
                    continue;
                };
                if !t.index.contains_key(w) {
                    visit(t, w);
                    let l = t.low[w].min(t.low[v]);
                    t.low.insert(v, l);
                } else if t.on.contains(w) {
                    let l = t.index[w].min(t.low[v]);
                    t.low.insert(v, l);
                }
            }
        }
        if t.low[v] == t.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = t.stack.pop() {
                t.on.remove(w);
                comp.push(w.clone());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                t.out.push(comp);
            }
        }
    }
    let mut t = T {
        g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in g.keys() {
        if !t.index.contains_key(v) {
            visit(&mut t, v);
        }
    }
    t.out
}

fn show(m: &Module) -> String {
    if m.is_empty() {
        "(root)".into()
    } else {
        m.join("::")
    }
}

fn report(g: &BTreeMap<Module, BTreeSet<Module>>, comps: &[Vec<Module>]) -> String {
    let mut s = String::new();
    for comp in comps {
        s.push_str(&format!(
            "circle: {}\n",
            comp.iter().map(show).collect::<Vec<_>>().join(", ")
        ));
        for a in comp {
            for b in g[a].iter().filter(|b| comp.contains(b)) {
                s.push_str(&format!("    {} -> {}\n", show(a), show(b)));
            }
        }
    }
    s
}

#[test]
fn no_module_imports_a_module_that_imports_it_back() {
    let mut all = String::new();
    for krate in CRATES {
        let c = read_crate(&root().join(krate));
        let g = c.edges();
        let comps = cycles(&g);
        if !comps.is_empty() {
            all.push_str(&format!("{krate}:\n{}", report(&g, &comps)));
        }
    }
    assert!(all.is_empty(), "module import circles:\n{all}");
}

#[test]
fn no_two_library_modules_share_a_name() {
    // Names that mean the same thing wherever they appear.
    const SHARED: &[&str] = &["mod", "lib", "error"];
    let mut seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for krate in CRATES {
        let src = root().join(krate);
        let mut files = Vec::new();
        rs_files(&src, &mut files);
        for f in files {
            let stem = f.file_stem().unwrap().to_string_lossy().into_owned();
            if !SHARED.contains(&stem.as_str()) {
                seen.entry(stem)
                    .or_default()
                    .push(f.strip_prefix(root()).unwrap().display().to_string());
            }
        }
        // Folders are module names too (`spend/` and `spend.rs` would clash in a reader's head).
        let mut dirs = vec![src.clone()];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() && p.file_name().is_some_and(|n| n != "bin") {
                    let name = p.file_name().unwrap().to_string_lossy().into_owned();
                    seen.entry(name)
                        .or_default()
                        .push(p.strip_prefix(root()).unwrap().display().to_string() + "/");
                    dirs.push(p);
                }
            }
        }
    }
    let dup: Vec<_> = seen.iter().filter(|(_, v)| v.len() > 1).collect();
    assert!(dup.is_empty(), "module names used twice: {dup:#?}");
}

/// The checker itself: a planted circle is found, a parent's re-export is followed, and a clean graph passes.
#[test]
fn the_circle_check_finds_a_planted_circle() {
    let dir = std::env::temp_dir().join(format!("tg-layout-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("a")).unwrap();
    std::fs::write(
        dir.join("lib.rs"),
        "pub mod a;\npub mod b;\npub use a::x::Thing;\n",
    )
    .unwrap();
    std::fs::write(dir.join("a/mod.rs"), "pub mod x;\npub use x::Thing;\n").unwrap();
    std::fs::write(
        dir.join("a/x.rs"),
        "//! uses crate::b in a comment only\nuse crate::b::{helper, other::{One}};\npub struct Thing;\n#[cfg(test)]\nmod tests { use crate::b::Test; }\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("b.rs"),
        "pub fn helper() -> crate::Thing { crate::Thing }\n",
    )
    .unwrap();
    let c = read_crate(&dir);
    let g = c.edges();
    let comps = cycles(&g);
    assert_eq!(comps.len(), 1, "{}", report(&g, &comps));
    assert_eq!(
        comps[0],
        vec![vec!["a".to_string(), "x".into()], vec!["b".to_string()]]
    );
    // Break it: b no longer names Thing.
    std::fs::write(dir.join("b.rs"), "pub fn helper() {}\n").unwrap();
    let c = read_crate(&dir);
    assert!(cycles(&c.edges()).is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

/// `pipeline/mod.rs` lists the phases in order; each phase file's header names the same number, and every
/// file in `pipeline/` other than `mod.rs` and `ctx.rs` is a listed phase.
#[test]
fn pipeline_phase_numbers_agree_with_the_phase_list() {
    let dir = root().join("dataplane/src/pipeline");
    let list = std::fs::read_to_string(dir.join("mod.rs")).unwrap();
    let mut phases = BTreeMap::new();
    for line in list.lines() {
        // `//! 3. [`route`]: ...`
        let Some(rest) = line.strip_prefix("//! ") else {
            continue;
        };
        let Some((n, tail)) = rest.split_once(". [`") else {
            continue;
        };
        let (Ok(n), Some((name, _))) = (n.parse::<u32>(), tail.split_once("`]")) else {
            continue;
        };
        phases.insert(name.to_string(), n);
    }
    assert!(phases.len() >= 8, "phase list not found in pipeline/mod.rs");
    let mut files = Vec::new();
    rs_files(&dir, &mut files);
    for f in files {
        let name = f.file_stem().unwrap().to_string_lossy().into_owned();
        if name == "mod" || name == "ctx" {
            continue;
        }
        let n = phases.get(&name).unwrap_or_else(|| {
            panic!("pipeline/{name}.rs is not a phase listed in pipeline/mod.rs")
        });
        let head = std::fs::read_to_string(&f).unwrap();
        let want = format!("//! Phase {n}, {name}:");
        assert!(
            head.starts_with(&want),
            "pipeline/{name}.rs should open with {want:?}"
        );
    }
}
