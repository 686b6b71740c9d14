//! The module layering, checked on the source: which top-level modules of
//! the library may name which (`crate::x`, `crate::{x, y}`, and `super::`
//! paths that climb out of a module), and no import cycle between them.
//!
//! From the bottom up: the leaves `topic` (names and filters) and
//! `metrics`; the hub and the configuration, neither using the other; the
//! transport layer (`transport`, once it exists); side by side above them
//! the front ends (`ws`, `sio`), the HTTP API (`api`) and the MQTT bridge
//! (`mqtt`), none importing another, and the presence store (`presence`),
//! which they call and which calls none of them; `server` and `cli` wire
//! everything together. Any import cycle between top-level modules fails.
//! Comments, string literals and `#[cfg(test)]` items are not read: a
//! documentation link or a unit test is not a dependency of the product.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

/// Modules that may import only the listed top-level modules (their own
/// submodules are always allowed).
const ONLY: &[(&str, &[&str], &str)] = &[
    (
        "topic",
        &[],
        "topic names and filters are a leaf that the configuration and the hub share",
    ),
    (
        "hub",
        &["metrics", "topic"],
        "the hub is the bottom layer: it knows no front end, store, bridge or configuration",
    ),
    (
        "config",
        &["topic"],
        "the configuration is loaded before anything else and may use only leaf modules",
    ),
    (
        "transport",
        &["hub", "http", "metrics", "topic"],
        "the transport layer knows the hub below it and the shared HTTP bits, no front end",
    ),
];

/// Groups of modules that sit side by side: none may import another.
const SIDE_BY_SIDE: &[(&[&str], &str)] = &[(
    &["ws", "sio", "api", "mqtt"],
    "front ends, the HTTP API and the MQTT bridge sit side by side; what they \
     share belongs below them (transport, gateway, hub)",
)];

/// Modules that must not import the listed ones. A rule on a module that
/// does not exist (yet) holds trivially.
const NEVER: &[(&str, &[&str], &str)] = &[
    (
        "transport",
        &["ws", "sio", "api"],
        "the transport layer sits below the front ends and the HTTP API",
    ),
    (
        "presence",
        &["ws", "sio", "api", "mqtt"],
        "the presence store sits beside the front ends; they call it, not the reverse",
    ),
    (
        "cluster",
        &["ws", "sio", "api", "mqtt", "presence", "transport"],
        "the cluster backplane sits behind the hub, beside the front ends and stores",
    ),
    (
        "gateway",
        &[
            "ws",
            "sio",
            "api",
            "mqtt",
            "presence",
            "cluster",
            "transport",
            "server",
        ],
        "the gateway holds what the front ends share, through interfaces: it knows no \
         front end, store, bridge or backplane",
    ),
    (
        "ws",
        &["presence", "mqtt", "cluster"],
        "a front end uses the presence store and the MQTT bridge through the gateway's \
         interfaces, and the backplane only through the hub",
    ),
    (
        "sio",
        &["presence", "mqtt", "cluster"],
        "a front end uses the presence store and the MQTT bridge through the gateway's \
         interfaces, and the backplane only through the hub",
    ),
    (
        "api",
        &["presence", "mqtt", "cluster"],
        "the HTTP API reads presence through the gateway's interface",
    ),
];

/// Modules that only the listed modules may import.
const IMPORTED_ONLY_BY: &[(&str, &[&str], &str)] = &[
    (
        "server",
        &["cli"],
        "the server wires every module together; nothing it wires may depend on it",
    ),
    (
        "cli",
        &[],
        "the command line is the top; only `main.rs` calls it",
    ),
];

/// Edges that break the rules above (or close a cycle) today and are being
/// removed: the shared connection machinery moves out of `ws` into
/// `transport` (used by `ws` and `sio` alike, so `ws` and `sio` stop
/// importing each other), and `ws` stops borrowing the HTTP API's error type
/// and bearer-token parser. An entry whose edge no longer exists fails the
/// test, so the list only shrinks.
const ALLOWED_FOR_NOW: &[(&str, &str)] = &[];

#[test]
fn modules_respect_the_layering() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let refs = scan_tree(&src);
    assert!(
        refs.iter().any(|r| r.from == "server" && r.to == "hub"),
        "the scanner found no `crate::` path in src/server.rs: is it still reading the source?"
    );
    let allowed: BTreeSet<(&str, &str)> = ALLOWED_FOR_NOW.iter().copied().collect();
    let mut failures = Vec::new();

    for r in &refs {
        if allowed.contains(&(r.from.as_str(), r.to.as_str())) {
            continue;
        }
        if let Some(why) = forbidden(&r.from, &r.to) {
            failures.push(format!("{r}: {why}"));
        }
    }

    let mut graph: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for r in &refs {
        if !allowed.contains(&(r.from.as_str(), r.to.as_str())) {
            graph.entry(&r.from).or_default().insert(&r.to);
        }
    }
    for (members, cycle) in cycles(&graph) {
        let mut text = format!(
            "import cycle among {members:?}, for one: {} -> {}",
            cycle.join(" -> "),
            cycle[0]
        );
        for (i, from) in cycle.iter().enumerate() {
            let to = cycle[(i + 1) % cycle.len()];
            for r in refs.iter().filter(|r| r.from == *from && r.to == to) {
                text.push_str(&format!("\n    {r}"));
            }
        }
        failures.push(text);
    }

    for (from, to) in ALLOWED_FOR_NOW {
        if !refs.iter().any(|r| r.from == *from && r.to == *to) {
            failures.push(format!(
                "`{from}` no longer imports `{to}`: remove ({from:?}, {to:?}) from ALLOWED_FOR_NOW"
            ));
        }
    }

    assert!(
        failures.is_empty(),
        "layering violations (rules at the top of tests/layering.rs):\n{}",
        failures.join("\n")
    );
}

/// Why `from` may not import `to`, if it may not.
fn forbidden(from: &str, to: &str) -> Option<String> {
    for (module, only, why) in ONLY {
        if from == *module && !only.contains(&to) {
            return Some(format!("`{from}` may import only {only:?} ({why})"));
        }
    }
    for (group, why) in SIDE_BY_SIDE {
        if group.contains(&from) && group.contains(&to) {
            return Some(format!("`{from}` may not import `{to}` ({why})"));
        }
    }
    for (module, never, why) in NEVER {
        if from == *module && never.contains(&to) {
            return Some(format!("`{from}` may not import `{to}` ({why})"));
        }
    }
    for (module, importers, why) in IMPORTED_ONLY_BY {
        if to == *module && !importers.contains(&from) {
            return Some(format!("only {importers:?} may import `{to}` ({why})"));
        }
    }
    None
}

/// The modules of each strongly connected component of more than one
/// module (Tarjan's algorithm), with one cycle through it.
fn cycles<'a>(
    graph: &BTreeMap<&'a str, BTreeSet<&'a str>>,
) -> Vec<(BTreeSet<&'a str>, Vec<&'a str>)> {
    struct Tarjan<'g, 'a> {
        graph: &'g BTreeMap<&'a str, BTreeSet<&'a str>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        components: Vec<Vec<&'a str>>,
    }
    impl<'a> Tarjan<'_, 'a> {
        fn visit(&mut self, v: &'a str) {
            let i = self.index.len();
            self.index.insert(v, i);
            self.low.insert(v, i);
            self.stack.push(v);
            self.on_stack.insert(v);
            let graph = self.graph;
            for &w in graph.get(v).into_iter().flatten() {
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let low = self.low[v].min(self.low[w]);
                    self.low.insert(v, low);
                } else if self.on_stack.contains(w) {
                    let low = self.low[v].min(self.index[w]);
                    self.low.insert(v, low);
                }
            }
            if self.low[v] == self.index[v] {
                let mut component = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on_stack.remove(w);
                    component.push(w);
                    if w == v {
                        break;
                    }
                }
                self.components.push(component);
            }
        }
    }
    let mut t = Tarjan {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        components: Vec::new(),
    };
    for &v in graph.keys() {
        if !t.index.contains_key(v) {
            t.visit(v);
        }
    }
    t.components
        .into_iter()
        .filter(|c| c.len() > 1)
        .map(|component| {
            // Walk from the smallest module, inside the component, until a
            // module repeats: that loop is a cycle.
            let members: BTreeSet<&str> = component.iter().copied().collect();
            let mut path = vec![*members.first().expect("non-empty")];
            loop {
                let last = *path.last().expect("non-empty");
                let next = graph[last]
                    .iter()
                    .copied()
                    .find(|w| members.contains(w))
                    .expect("a strongly connected module has a successor inside");
                if let Some(at) = path.iter().position(|m| *m == next) {
                    break (members, path.split_off(at));
                }
                path.push(next);
            }
        })
        .collect()
}

/// One `crate::` (or climbing `super::`) path from a top-level module to
/// another.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Reference {
    from: String,
    to: String,
    file: PathBuf,
    line: usize,
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let file = self.file.strip_prefix(root).unwrap_or(&self.file);
        write!(
            f,
            "{}:{}: `{}` imports `{}`",
            file.display(),
            self.line,
            self.from,
            self.to
        )
    }
}

/// Every reference between different top-level modules in the library's
/// source under `src` (`main.rs` and `bin/` are other crates).
fn scan_tree(src: &Path) -> Vec<Reference> {
    let mut files = Vec::new();
    collect_rs(src, &mut files);
    files.sort();
    // Modules declared `#[cfg(test)] mod name;` live in files of their own.
    let mut parsed = Vec::new();
    let mut test_only: Vec<Vec<String>> = Vec::new();
    for file in files {
        let rel = file.strip_prefix(src).expect("under src");
        let Some(module) = module_path(rel) else {
            continue;
        };
        let text = std::fs::read_to_string(&file).expect("readable source");
        let scanned = scan(&module, &text);
        test_only.extend(scanned.test_modules.iter().map(|name| {
            let mut m = module.clone();
            m.push(name.clone());
            m
        }));
        parsed.push((file, module, scanned.refs));
    }
    let mut refs = Vec::new();
    for (file, module, found) in parsed {
        if test_only.iter().any(|t| module.starts_with(t)) {
            continue;
        }
        for (to, line) in found {
            if module.first() != Some(&to) {
                refs.push(Reference {
                    from: module[0].clone(),
                    to,
                    file: file.clone(),
                    line,
                });
            }
        }
    }
    refs
}

fn collect_rs(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable directory") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            collect_rs(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `a.rs` and `a/mod.rs` are `[a]`, `a/b.rs` is `[a, b]`; `None` for the
/// crate root and for files of other crates (`main.rs`, `bin/`).
fn module_path(rel: &Path) -> Option<Vec<String>> {
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop()?;
    if parts.first().is_some_and(|p| p == "bin") {
        return None;
    }
    let stem = last.strip_suffix(".rs")?;
    if parts.is_empty() && matches!(stem, "lib" | "main") {
        return None;
    }
    if stem != "mod" {
        parts.push(stem.to_string());
    }
    Some(parts)
}

struct Scanned {
    /// Top-level module named, and the line.
    refs: Vec<(String, usize)>,
    /// `#[cfg(test)] mod name;` declared in this file.
    test_modules: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    PathSep,
    Punct(char),
}

/// Reads one file of module `module` (e.g. `[ws, frame]`).
fn scan(module: &[String], text: &str) -> Scanned {
    let code = strip_tests(&strip_comments_and_literals(text));
    let mut test_modules = Vec::new();
    for item in &code.removed {
        let words: Vec<&str> = item.split_whitespace().collect();
        if let [.., "mod", name] = words.as_slice()
            && let Some(name) = name.strip_suffix(';')
        {
            test_modules.push(name.to_string());
        }
    }
    let tokens = tokenize(&code.text);
    let mut refs = Vec::new();
    // Inline `mod name { … }` blocks: (name, brace depth inside them).
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let ident = |i: usize| match tokens.get(i) {
        Some((Token::Ident(s), _)) => Some(s.as_str()),
        _ => None,
    };
    let is = |i: usize, t: &Token| tokens.get(i).map(|(tok, _)| tok) == Some(t);
    for i in 0..tokens.len() {
        let line = tokens[i].1;
        match &tokens[i].0 {
            Token::Punct('{') => depth += 1,
            Token::Punct('}') => {
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
                depth = depth.saturating_sub(1);
            }
            Token::Ident(word) if word == "mod" => {
                if let Some(name) = ident(i + 1)
                    && is(i + 2, &Token::Punct('{'))
                {
                    inline.push((name.to_string(), depth + 1));
                }
            }
            Token::Ident(word)
                if (word == "crate" || word == "super")
                    && is(i + 1, &Token::PathSep)
                    && !(i > 0 && is(i - 1, &Token::PathSep)) =>
            {
                // How many levels the path climbs, and where it then starts.
                let (climb, start) = if word == "crate" {
                    (usize::MAX, i + 2)
                } else {
                    let mut k = 0;
                    let mut j = i;
                    while ident(j) == Some("super") && is(j + 1, &Token::PathSep) {
                        k += 1;
                        j += 2;
                    }
                    (k, j)
                };
                let here = module.len() + inline.len();
                if climb != usize::MAX && climb != here {
                    continue; // stays inside the top-level module
                }
                for name in path_heads(&tokens, start) {
                    refs.push((name, line));
                }
            }
            _ => {}
        }
    }
    Scanned { refs, test_modules }
}

/// The top-level names a path continues with at `start`: `x` for `x::…`,
/// each item's first name for `{x, y::z, self}` (not `self` or `*`).
fn path_heads(tokens: &[(Token, usize)], start: usize) -> Vec<String> {
    match tokens.get(start) {
        Some((Token::Ident(name), _)) => vec![name.clone()],
        Some((Token::Punct('{'), _)) => {
            let mut out = Vec::new();
            let mut depth = 0;
            let mut expect_name = true;
            for (tok, _) in &tokens[start..] {
                match tok {
                    Token::Punct('{') => {
                        depth += 1;
                        if depth == 1 {
                            expect_name = true;
                        }
                        continue;
                    }
                    Token::Punct('}') => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    Token::Punct(',') if depth == 1 => {
                        expect_name = true;
                        continue;
                    }
                    Token::Ident(name) if depth == 1 && expect_name && name != "self" => {
                        out.push(name.clone());
                    }
                    _ => {}
                }
                expect_name = false;
            }
            out
        }
        _ => Vec::new(),
    }
}

fn tokenize(code: &str) -> Vec<(Token, usize)> {
    let chars: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    let mut line = 1;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '\n' {
            line += 1;
            i += 1;
        } else if c.is_whitespace() {
            i += 1;
        } else if c.is_alphanumeric() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            out.push((Token::Ident(chars[start..i].iter().collect()), line));
        } else if c == ':' && chars.get(i + 1) == Some(&':') {
            out.push((Token::PathSep, line));
            i += 2;
        } else {
            out.push((Token::Punct(c), line));
            i += 1;
        }
    }
    out
}

/// The source with comments and the contents of string and character
/// literals blanked out (line breaks kept, so lines still count).
fn strip_comments_and_literals(text: &str) -> String {
    let c: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let blank = |ch: char| if ch == '\n' { '\n' } else { ' ' };
    let ident_char = |ch: char| ch.is_alphanumeric() || ch == '_';
    let mut i = 0;
    while i < c.len() {
        let prev_ident = i > 0 && ident_char(c[i - 1]);
        if c[i] == '/' && c.get(i + 1) == Some(&'/') {
            while i < c.len() && c[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if c[i] == '/' && c.get(i + 1) == Some(&'*') {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(c[i]));
                    i += 1;
                }
            }
        } else if c[i] == 'r'
            && (!prev_ident || (i > 0 && c[i - 1] == 'b' && !(i > 1 && ident_char(c[i - 2]))))
            && matches!(c.get(i + 1), Some('#' | '"'))
        {
            // A raw string r"…", r#"…"#, br#"…"# (or an identifier `r`).
            let mut j = i + 1;
            let mut hashes = 0;
            while c.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if c.get(j) != Some(&'"') {
                out.push(c[i]);
                i += 1;
                continue;
            }
            out.extend(&c[i..=j]);
            i = j + 1;
            while i < c.len() {
                if c[i] == '"' && (1..=hashes).all(|k| c.get(i + k) == Some(&'#')) {
                    out.extend(&c[i..=i + hashes]);
                    i += hashes + 1;
                    break;
                }
                out.push(blank(c[i]));
                i += 1;
            }
        } else if c[i] == '"' {
            out.push('"');
            i += 1;
            while i < c.len() && c[i] != '"' {
                if c[i] == '\\' {
                    out.push(' ');
                    i += 1;
                }
                if i < c.len() {
                    out.push(blank(c[i]));
                    i += 1;
                }
            }
            out.push('"');
            i += 1;
        } else if c[i] == '\'' {
            // A character literal ('x', '\n', '\u{1f}'), or a lifetime.
            if c.get(i + 1) == Some(&'\\') {
                let mut j = i + 3;
                while j < c.len() && c[j] != '\'' {
                    j += 1;
                }
                out.push_str(&" ".repeat(j + 1 - i));
                i = j + 1;
            } else if c.get(i + 2) == Some(&'\'') {
                out.push_str("   ");
                i += 3;
            } else {
                out.push('\'');
                i += 1;
            }
        } else {
            out.push(c[i]);
            i += 1;
        }
    }
    out
}

struct WithoutTests {
    text: String,
    /// The text of each item removed, up to its `{` or `;`.
    removed: Vec<String>,
}

/// Blanks out every item under `#[cfg(test)]`: the attribute, any further
/// attributes, and the item up to its `;` or through its `{ … }` block.
fn strip_tests(code: &str) -> WithoutTests {
    let mut c: Vec<char> = code.chars().collect();
    let mut removed = Vec::new();
    let pattern: Vec<char> = "#[cfg(test)]".chars().collect();
    let mut i = 0;
    while i + pattern.len() <= c.len() {
        if c[i..i + pattern.len()] != pattern[..] {
            i += 1;
            continue;
        }
        let start = i;
        let mut j = i + pattern.len();
        let mut head = String::new();
        let mut depth = 0usize;
        while j < c.len() {
            match c[j] {
                '{' => depth += 1,
                '}' => depth = depth.saturating_sub(1),
                ';' if depth == 0 => {
                    head.push(';');
                    j += 1;
                    break;
                }
                _ => {}
            }
            if depth == 0 && c[j] != '}' {
                head.push(c[j]);
            }
            j += 1;
            if depth == 0 && c[j - 1] == '}' {
                break;
            }
        }
        removed.push(head);
        for ch in &mut c[start..j] {
            if *ch != '\n' {
                *ch = ' ';
            }
        }
        i = j;
    }
    WithoutTests {
        text: c.into_iter().collect(),
        removed,
    }
}

// ---- the scanner itself ----------------------------------------------------

fn names(module: &[&str], text: &str) -> Vec<(String, usize)> {
    let module: Vec<String> = module.iter().map(|s| s.to_string()).collect();
    scan(&module, text).refs
}

#[test]
fn scanner_reads_paths_in_code_only() {
    let text = r##"//! See [`crate::docs_only`].
use crate::hub::Hub;
use crate::{config::Config, gateway, self};
use super::sibling;
/* crate::in_block /* nested crate::deeper */ crate::still */
fn f<'a>(x: &'a str) -> char {
    let _ = "crate::in_string \" crate::escaped";
    let _ = r#"crate::raw " crate::raw_too"#;
    let _ = crate::metrics::Stage::Fanout;
    let _ = other::crate_like::x; // crate::comment
    '{'
}
mod inline {
    use super::super::super::climbed;
    use super::inner_sibling;
}
#[cfg(test)]
mod tests {
    use crate::test_only;
}
#[cfg(test)]
use crate::also_test_only;
#[cfg(test)]
mod test_file;
pub fn g() { crate::after_tests::x() }
"##;
    assert_eq!(
        names(&["ws", "conn"], text),
        [
            ("hub".to_string(), 2),
            ("config".to_string(), 3),
            ("gateway".to_string(), 3),
            ("metrics".to_string(), 9),
            ("climbed".to_string(), 14),
            ("after_tests".to_string(), 25),
        ]
    );
    // From a top-level module, `super::x` is the crate's `x`.
    assert_eq!(
        names(&["api"], "use super::auth::Identity;\n"),
        [("auth".to_string(), 1)]
    );
    let module = vec!["ws".to_string()];
    assert_eq!(scan(&module, text).test_modules, ["test_file"]);
}

#[test]
fn cycles_are_found_and_the_rules_are_read() {
    let mut graph: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (a, b) in [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d"), ("d", "e")] {
        graph.entry(a).or_default().insert(b);
    }
    let found = cycles(&graph);
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].0, BTreeSet::from(["a", "b", "c"]));
    assert_eq!(found[0].1, ["a", "b", "c"]);
    graph.get_mut("c").expect("c").remove("a");
    assert!(cycles(&graph).is_empty());

    assert!(forbidden("hub", "metrics").is_none());
    assert!(forbidden("hub", "config").is_some());
    assert!(forbidden("config", "topic").is_none());
    assert!(forbidden("config", "hub").is_some());
    assert!(forbidden("ws", "sio").is_some());
    assert!(forbidden("mqtt", "api").is_some());
    assert!(forbidden("api", "ws").is_some());
    assert!(forbidden("transport", "api").is_some());
    assert!(forbidden("transport", "hub").is_none());
    assert!(forbidden("ws", "server").is_some());
    assert!(forbidden("cli", "server").is_none());
    assert!(forbidden("ws", "hub").is_none());
}
