//! The layer rule of `src/lib.rs`, checked: a module imports only from its own layer or a
//! lower one, and the modules import each other without cycles.
//!
//! Every `crate::` and `super::` path in `src/**` counts, inline paths as well as `use` lines
//! (cycles close through inline paths as easily), test modules included. Comments, strings and
//! character literals are skipped. `main.rs` is a separate crate: its `tfmirror::` paths count.
//!
//! `TFM_LAYERING_SRC=<dir>` checks another source tree (for example an older commit's,
//! unpacked with `git archive`).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// Every top-level module and its layer. A new module must be placed here.
const LAYERS: &[(&str, u8, &str)] = &[
    // L0: leaves; they import only other leaves.
    ("clock", 0, "leaf"),
    ("config", 0, "leaf"),
    ("flight", 0, "leaf"),
    ("constraint", 0, "leaf"),
    ("fuzzing", 0, "leaf"),
    ("identity", 0, "leaf"),
    ("logbuf", 0, "leaf"),
    ("logbridge", 0, "leaf"),
    ("secret", 0, "leaf"),
    ("metrics", 0, "leaf"),
    ("pem", 0, "leaf"),
    // Writes GitLab-shaped responses; imports nothing from the crate, and the registry
    // writes through it, so it sits below the registry rather than in the edge.
    ("respond", 0, "leaf"),
    ("rewrite", 0, "leaf"),
    ("routes", 0, "leaf"),
    ("tls", 0, "leaf"),
    ("token", 0, "leaf"),
    ("windows", 0, "leaf"),
    // L1: the store.
    ("cache", 1, "store"),
    // L2: the upstream.
    ("upstream", 2, "upstream"),
    // L3: who may have what.
    ("access", 3, "access"),
    // L4: cache decisions for registry routes.
    ("registry", 4, "registry"),
    // The provider mirror: its registries, verification and protocol answers; a peer of the
    // module registry logic, on the store and upstream layers.
    ("providers", 4, "registry"),
    // Signed bundles: a cache directory's records and blobs exported and imported; on the
    // store (and the leaves), beside the registry logic that wrote those records.
    ("bundle", 4, "registry"),
    // L5: pingora-facing.
    ("edge", 5, "edge"),
    // L6: wiring and commands.
    ("cli", 6, "top"),
    ("main", 6, "top"),
    ("server", 6, "top"),
    ("sync", 6, "top"),
];

/// One import: `from` (a top-level module) names `to` at `file:line`.
#[derive(Debug, Clone)]
struct Edge {
    from: String,
    to: String,
    file: String,
    line: usize,
}

#[test]
fn imports_point_down_the_layers() {
    let src = source_root();
    let edges = edges(&src);
    assert!(
        edges.len() > 50,
        "the parser found only {} edges",
        edges.len()
    );
    let layer = layer_map();
    let mut upward = Vec::new();
    for e in &edges {
        let (Some(&(lf, nf)), Some(&(lt, nt))) = (layer.get(&e.from), layer.get(&e.to)) else {
            panic!(
                "module `{}` or `{}` has no layer (add it to LAYERS in tests/layering.rs)",
                e.from, e.to
            );
        };
        if lt > lf {
            upward.push(format!(
                "{}:{}: {} (L{lf} {nf}) imports {} (L{lt} {nt})",
                e.file, e.line, e.from, e.to
            ));
        }
    }
    upward.sort();
    upward.dedup();
    assert!(
        upward.is_empty(),
        "{} upward imports (see the layer rule in src/lib.rs):\n{}",
        upward.len(),
        upward.join("\n")
    );
}

#[test]
fn modules_import_each_other_without_cycles() {
    let src = source_root();
    let edges = edges(&src);
    let cycles = cycles(&edges);
    let shown: Vec<String> = cycles
        .iter()
        .map(|c| {
            let witness: Vec<String> = edges
                .iter()
                .filter(|e| c.contains(&e.from) && c.contains(&e.to) && e.from != e.to)
                .map(|e| format!("  {} -> {} ({}:{})", e.from, e.to, e.file, e.line))
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            format!("{{{}}}\n{}", c.join(", "), witness.join("\n"))
        })
        .collect();
    println!("import cycles between modules: {}", cycles.len());
    assert!(
        cycles.is_empty(),
        "{} import cycles between modules:\n{}",
        cycles.len(),
        shown.join("\n")
    );
}

/// Every module under `src/` has a layer, so the rule covers new modules too; and the table
/// names no module that is gone.
#[test]
fn every_module_has_a_layer() {
    let layer = layer_map();
    let modules = top_modules(&source_root());
    for m in &modules {
        assert!(
            layer.contains_key(m),
            "module `{m}` has no layer (add it to LAYERS in tests/layering.rs)"
        );
    }
    for m in layer.keys() {
        assert!(
            modules.contains(m),
            "LAYERS names `{m}`, which src/ does not have"
        );
    }
}

/// Below the edge, decisions take a typed route and return a `Reply` value: only `src/edge/`
/// names pingora's `Session` (the one writer, `edge::write`, puts replies on it).
#[test]
fn only_the_edge_names_pingoras_session() {
    let root = source_root();
    let edge = root.join("edge");
    for file in rust_files(&root) {
        if file.starts_with(&edge) {
            continue;
        }
        let code = strip_comments_only(&fs::read_to_string(&file).expect("read"));
        assert!(
            !code.contains("proxy::Session") && !code.contains("proxy::{Session"),
            "{} names pingora's Session: move the I/O to src/edge/",
            file.display()
        );
    }
}

/// No production file over 600 lines: one concern per file (tests beside the code they test,
/// in files of their own, are not counted).
#[test]
fn production_files_stay_under_600_lines() {
    let mut long = Vec::new();
    for file in rust_files(&source_root()) {
        let text = fs::read_to_string(&file).expect("read");
        let production = text.split("\n#[cfg(test)]").next().unwrap_or(&text);
        let n = production.lines().count();
        let is_tests = file
            .file_name()
            .is_some_and(|f| f.to_string_lossy().contains("tests"));
        if n > 600 && !is_tests {
            long.push(format!("{}: {n} lines", file.display()));
        }
    }
    assert!(
        long.is_empty(),
        "split these by concern:\n{}",
        long.join("\n")
    );
}

/// The parser itself: inline paths, groups, `super::` from nested files and inline modules,
/// and nothing from comments or strings.
#[test]
fn the_parser_reads_paths_as_rustc_does() {
    let text = r#####"
use crate::{cache::Cache, metrics::{self, X}};
// use crate::commented::Out;
/* use crate::blocked::Out; /* nested */ */
/// [`crate::doc::Link`]
fn f() -> crate::health::Health {
    let s = "crate::string::Out";
    let r = r#"crate::raw::Out"#;
    let c = '"'; let q = '\''; let _l: &'static str = "";
    crate::upstream::go(); pub(crate) fn g() {}
    super::sibling::h();
    $crate::macro_path::Out;
}
mod tests {
    use super::*;
    use super::super::up::Thing;
}
"#####;
    let found = |module: &[&str]| -> Vec<String> {
        let module: Vec<String> = module.iter().map(|s| s.to_string()).collect();
        let mut v: Vec<String> = paths_in(text, &module, "crate")
            .into_iter()
            .map(|(m, _)| m)
            .collect();
        v.sort();
        v.dedup();
        v
    };
    assert_eq!(
        found(&["registry", "listing"]),
        ["cache", "health", "metrics", "registry", "upstream"]
    );
    // A file included with `#[path]` sits where its `mod` says, not where its name says.
    assert_eq!(
        path_attributes("#[cfg(test)]\n#[path = \"learn_tests.rs\"]\nmod tests;"),
        [("learn_tests.rs".to_string(), "tests".to_string())]
    );
    // From a top-level file, `super::` is the crate root: `sibling` is a module then.
    assert_eq!(
        found(&["proxy"]),
        ["cache", "health", "metrics", "proxy", "sibling", "up", "upstream"]
    );
}

fn source_root() -> PathBuf {
    std::env::var_os("TFM_LAYERING_SRC")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("src"))
}

fn layer_map() -> BTreeMap<String, (u8, &'static str)> {
    LAYERS
        .iter()
        .map(|(m, l, n)| (m.to_string(), (*l, *n)))
        .collect()
}

/// Top-level modules: `src/x.rs` and `src/x/mod.rs`, and `main` for the binary.
fn top_modules(src: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for e in fs::read_dir(src).expect("src/") {
        let p = e.expect("entry").path();
        let name = p.file_stem().unwrap().to_string_lossy().into_owned();
        if p.is_dir() || (p.extension().is_some_and(|x| x == "rs") && name != "lib") {
            out.insert(name);
        }
    }
    out
}

/// Every import edge between two different top-level modules.
fn edges(src: &Path) -> Vec<Edge> {
    let modules = top_modules(src);
    let files = rust_files(src);
    let module_of = |file: &Path| -> Vec<String> {
        let rel = file.strip_prefix(src).unwrap();
        let mut module: Vec<String> = rel
            .with_extension("")
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        if module.last().is_some_and(|m| m == "mod" || m == "lib") {
            module.pop();
        }
        module
    };
    // `#[path = "x_tests.rs"] mod tests;` puts x_tests.rs at x::tests, not at its file name.
    let mut redirected: BTreeMap<PathBuf, Vec<String>> = BTreeMap::new();
    for file in &files {
        let text = strip_comments_only(&fs::read_to_string(file).expect("read source"));
        for (target, name) in path_attributes(&text) {
            let mut module = module_of(file);
            module.push(name);
            redirected.insert(file.parent().unwrap().join(target), module);
        }
    }
    let mut out = Vec::new();
    for file in files {
        let rel = file.strip_prefix(src).unwrap();
        let module = redirected
            .get(&file)
            .cloned()
            .unwrap_or_else(|| module_of(&file));
        let Some(from) = module.first().cloned() else {
            continue; // lib.rs: only `mod` declarations
        };
        let root = if from == "main" { "tfmirror" } else { "crate" };
        let text = fs::read_to_string(&file).expect("read source");
        for (to, line) in paths_in(&text, &module, root) {
            if to == from || !modules.contains(&to) {
                continue; // within one module, or an item of the crate root
            }
            out.push(Edge {
                from: from.clone(),
                to,
                file: format!("src/{}", rel.display()),
                line,
            });
        }
    }
    out
}

/// `#[path = "file"] mod name`: (file, name) for each.
fn path_attributes(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("#[path") {
        rest = &rest[at + 6..];
        let Some(open) = rest.find('"') else { break };
        let Some(len) = rest[open + 1..].find('"') else {
            break;
        };
        let target = rest[open + 1..open + 1 + len].to_string();
        let after = rest[open + 1 + len..].trim_start_matches(['"', ']']);
        let words: Vec<&str> = after.split_whitespace().take(3).collect();
        let name = match words.as_slice() {
            ["mod", n, ..] | ["pub", "mod", n] | ["pub(crate)", "mod", n] => *n,
            _ => continue,
        };
        let name: String = name
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        out.push((target, name));
    }
    out
}

/// `text` without comments (strings kept, for `#[path = "..."]`).
fn strip_comments_only(text: &str) -> String {
    text.lines()
        .map(|l| l.split_once("//").map_or(l, |(code, _)| code))
        .collect::<Vec<_>>()
        .join("\n")
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).expect("read dir") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            out.extend(rust_files(&p));
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// The top-level modules named by `root::` and `super::` paths in `text`, with their line
/// numbers. `module` is the file's module path (`["registry", "listing"]`).
fn paths_in(text: &str, module: &[String], root: &str) -> Vec<(String, usize)> {
    let code = strip(text);
    let b = code.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    // Inline modules (`mod tests { ... }`) deepen `super::`: (name, brace depth inside it).
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let mut line = 1;
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\n' => line += 1,
            b'{' => depth += 1,
            b'}' => {
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
                depth = depth.saturating_sub(1);
            }
            _ => {}
        }
        let at_word = ident(b[i]) && (i == 0 || !(ident(b[i - 1]) || b[i - 1] == b'$'));
        if !at_word {
            i += 1;
            continue;
        }
        let end = (i..b.len()).find(|&j| !ident(b[j])).unwrap_or(b.len());
        let word = &code[i..end];
        if word == "mod" {
            if let Some((name, brace)) = inline_mod(&code[end..]) {
                inline.push((name, depth + 1));
                // Continue at the brace, so it is counted.
                i = end + brace;
                continue;
            }
        }
        if word != root && word != "super" {
            i = end;
            continue;
        }
        // Resolve a chain of `super::`/`root::` prefixes to a module path.
        let mut here: Vec<String> = module.to_vec();
        here.extend(inline.iter().map(|(n, _)| n.clone()));
        let mut j = i;
        loop {
            let rest = &code[j..];
            if let Some(r) = rest.strip_prefix(root).filter(|r| r.starts_with("::")) {
                here.clear();
                j = code.len() - r.len() + 2;
            } else if let Some(r) = rest.strip_prefix("super").filter(|r| r.starts_with("::")) {
                here.pop();
                j = code.len() - r.len() + 2;
            } else {
                break;
            }
            j += code[j..].len() - code[j..].trim_start().len();
        }
        if j == i {
            i = end; // `crate` or `super` not followed by `::` (e.g. `pub(crate)`)
            continue;
        }
        if let Some(top) = here.first() {
            out.push((top.clone(), line));
        } else {
            // At the crate root: the next segment, or each entry of a `{...}` group.
            for name in root_names(&code[j..]) {
                out.push((name, line));
            }
        }
        i = end;
    }
    out
}

/// `mod name {` at the start of `rest` (after the keyword): the name and the brace offset.
fn inline_mod(rest: &str) -> Option<(String, usize)> {
    let t = rest.trim_start();
    let name_len = t
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(t.len());
    if name_len == 0 {
        return None;
    }
    let after = t[name_len..].trim_start();
    after.starts_with('{').then(|| {
        (
            t[..name_len].to_string(),
            rest.len() - after.len(), // offset of the brace in `rest`
        )
    })
}

/// The first segment after `crate::`: one name, or the first name of each group entry.
fn root_names(rest: &str) -> Vec<String> {
    let first = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let rest = rest.trim_start();
    let Some(group) = rest.strip_prefix('{') else {
        return vec![first(rest)];
    };
    // Split the group at its top-level commas.
    let mut names = Vec::new();
    let mut level = 0;
    let mut start = 0;
    for (k, c) in group.char_indices() {
        match c {
            '{' => level += 1,
            '}' if level == 0 => {
                names.push(first(&group[start..k]));
                break;
            }
            '}' => level -= 1,
            ',' if level == 0 => {
                names.push(first(&group[start..k]));
                start = k + 1;
            }
            _ => {}
        }
    }
    names.retain(|n| !n.is_empty() && n != "self");
    names
}

/// `text` with comments, strings and character literals blanked (newlines kept, so line
/// numbers still hold).
fn strip(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = b.to_vec();
    let blank = |out: &mut Vec<u8>, from: usize, to: usize| {
        for c in &mut out[from..to] {
            if *c != b'\n' {
                *c = b' ';
            }
        }
    };
    let mut i = 0;
    while i < b.len() {
        let rest = &b[i..];
        if rest.starts_with(b"//") {
            let end = rest
                .iter()
                .position(|&c| c == b'\n')
                .map_or(b.len(), |p| i + p);
            blank(&mut out, i, end);
            i = end;
        } else if rest.starts_with(b"/*") {
            let mut level = 0;
            let mut j = i;
            while j < b.len() {
                if b[j..].starts_with(b"/*") {
                    level += 1;
                    j += 2;
                } else if b[j..].starts_with(b"*/") {
                    level -= 1;
                    j += 2;
                    if level == 0 {
                        break;
                    }
                } else {
                    j += 1;
                }
            }
            blank(&mut out, i, j);
            i = j;
        } else if let Some(hashes) = raw_string_start(b, i) {
            // r"..." or r#"..."#: ends at a quote followed by as many hashes.
            let open = i + 1 + hashes + 1; // past `r`, hashes, quote
            let close: Vec<u8> = std::iter::once(b'"')
                .chain(std::iter::repeat_n(b'#', hashes))
                .collect();
            let end = (open..b.len())
                .find(|&j| b[j..].starts_with(&close))
                .map_or(b.len(), |j| j + close.len());
            blank(&mut out, i, end);
            i = end;
        } else if b[i] == b'"' {
            let mut j = i + 1;
            while j < b.len() && b[j] != b'"' {
                j += if b[j] == b'\\' { 2 } else { 1 };
            }
            let end = (j + 1).min(b.len());
            blank(&mut out, i, end);
            i = end;
        } else if b[i] == b'\'' {
            // A char literal ('x', '\n', '\'', '"'), or a lifetime ('a), left alone.
            let end = if b.get(i + 1) == Some(&b'\\') {
                (i + 3..b.len()).find(|&j| b[j] == b'\'').map(|j| j + 1)
            } else {
                let ch = text[i + 1..].chars().next().map_or(1, char::len_utf8);
                (b.get(i + 1 + ch) == Some(&b'\'')).then_some(i + 2 + ch)
            };
            match end {
                Some(end) => {
                    blank(&mut out, i, end);
                    i = end;
                }
                None => i += 1,
            }
        } else {
            i += 1;
        }
    }
    String::from_utf8(out).expect("blanking keeps UTF-8 boundaries")
}

/// At `i`, a raw string `r"`, `r#"`, `br"`...: how many hashes it uses.
fn raw_string_start(b: &[u8], i: usize) -> Option<usize> {
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let starts = b[i] == b'r'
        && (i == 0 || !ident(b[i - 1]) || (b[i - 1] == b'b' && (i < 2 || !ident(b[i - 2]))));
    if !starts {
        return None;
    }
    let hashes = b[i + 1..].iter().take_while(|&&c| c == b'#').count();
    (b.get(i + 1 + hashes) == Some(&b'"')).then_some(hashes)
}

/// Strongly connected components with more than one module (Tarjan), each sorted.
fn cycles(edges: &[Edge]) -> Vec<Vec<String>> {
    let mut graph: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for e in edges {
        graph.entry(&e.from).or_default().insert(&e.to);
        graph.entry(&e.to).or_default();
    }
    struct Tarjan<'a> {
        graph: &'a BTreeMap<&'a str, BTreeSet<&'a str>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    impl<'a> Tarjan<'a> {
        fn visit(&mut self, v: &'a str) {
            let n = self.index.len();
            self.index.insert(v, n);
            self.low.insert(v, n);
            self.stack.push(v);
            self.on_stack.insert(v);
            for &w in &self.graph[v] {
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let lw = self.low[w];
                    let lv = self.low.get_mut(v).unwrap();
                    *lv = (*lv).min(lw);
                } else if self.on_stack.contains(w) {
                    let iw = self.index[w];
                    let lv = self.low.get_mut(v).unwrap();
                    *lv = (*lv).min(iw);
                }
            }
            if self.low[v] == self.index[v] {
                let mut scc = Vec::new();
                loop {
                    let w = self.stack.pop().unwrap();
                    self.on_stack.remove(w);
                    scc.push(w.to_string());
                    if w == v {
                        break;
                    }
                }
                if scc.len() > 1 {
                    scc.sort();
                    self.out.push(scc);
                }
            }
        }
    }
    let mut t = Tarjan {
        graph: &graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: Vec::new(),
    };
    for &v in graph.keys() {
        if !t.index.contains_key(v) {
            t.visit(v);
        }
    }
    t.out.sort();
    t.out
}
