//! The rule that keeps `vmm` readable from the bottom up: imports between its top-level
//! modules point one way. Leaf modules (events, errors, memory, state, devices, cpu,
//! uffd) sit at the bottom, migration above them, the control loop and the HTTP API on
//! top. This reads every `crate::` path in `vmm/src` (in `use` lines and inline), builds
//! the graph of top-level modules, and fails on any cycle and on any import that points
//! up the layer table below. A file's unit tests (its `#[cfg(test)] mod tests`) may
//! drive it with a module above it, and are not read.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Lowest layer first. A module may import only from its own layer or a lower one, and
/// the graph must still have no cycle within a layer. A new module must be added here.
const LAYERS: &[&[&str]] = &[
    // Leaves: no VM, no migration; small, standalone helpers and plain data.
    &[
        "arch",
        "errors",
        "events",
        "inherited_fd",
        "logger",
        "net",
        "seccomp",
        "state",
        "sys",
        "thread_priority",
    ],
    &["config", "sparse"],
    &["memsum"],
    // The snapshot directory format the offload daemon shares: no VM inside (its own test
    // checks that), on sparse files and piece sums; guest RAM and uffd use its mapping type.
    &["snapshot_format"],
    &["memory_manager"],
    &["devices", "cpu", "uffd"],
    &["vm"],
    // vm.snapshot's store: the format applied to a VM.
    &["snapshot_store"],
    &["migration"],
    &["api"],
    &["control"],
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of `text` without comments, without the contents of string and char
/// literals (doc comments name modules in prose; strings hold braces), and without its
/// unit tests.
fn code_only(text: &str) -> String {
    without_tests(&blank_literals(text))
}

/// `text` with comments and the insides of string and char literals blanked out
/// (newlines kept), so braces and paths in them count for nothing.
fn blank_literals(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            i += 2;
            while i < chars.len() && !(chars[i] == '*' && chars.get(i + 1) == Some(&'/')) {
                out.push(blank(chars[i]));
                i += 1;
            }
            i += 2;
        } else if c == 'r'
            && matches!(next, Some('"' | '#'))
            && !ident_char(chars.get(i.wrapping_sub(1)))
        {
            let mut j = i + 1;
            while chars.get(j) == Some(&'#') {
                j += 1;
            }
            if chars.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            let hashes = j - i - 1;
            out.push('"');
            i = j + 1;
            while i < chars.len() {
                if chars[i] == '"' && (0..hashes).all(|k| chars.get(i + 1 + k) == Some(&'#')) {
                    i += 1 + hashes;
                    break;
                }
                out.push(blank(chars[i]));
                i += 1;
            }
            out.push('"');
        } else if c == '"' {
            out.push('"');
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    out.push(' ');
                    i += 1;
                }
                if let Some(&ch) = chars.get(i) {
                    out.push(blank(ch));
                }
                i += 1;
            }
            out.push('"');
            i += 1;
        } else if c == '\'' && (next == Some('\\') || chars.get(i + 2) == Some(&'\'')) {
            // A char literal (a lifetime has no closing quote right after one char).
            i += 1;
            while i < chars.len() && chars[i] != '\'' {
                if chars[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            out.push_str("' '");
            i += 1;
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn ident_char(c: Option<&char>) -> bool {
    c.is_some_and(|c| c.is_ascii_alphanumeric() || *c == '_')
}

/// `text` without its `#[cfg(test)] mod tests { ... }` block (braces counted; test
/// code with unbalanced braces in strings would confuse it, and then fail the test).
fn without_tests(text: &str) -> String {
    const START: &str = "#[cfg(test)]\nmod tests {";
    let Some(start) = text.find(START) else {
        return text.to_string();
    };
    let mut depth = 0usize;
    for (i, c) in text[start..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    let end = start + i + 1;
                    return format!("{}{}", &text[..start], without_tests(&text[end..]));
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced braces after #[cfg(test)] mod tests");
}

fn ident(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// The top-level modules a file names through `crate::`: `crate::a::…` gives `a`,
/// `crate::{a, b::c, …}` gives `a` and `b`.
fn imported(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let before = rest[..i].chars().next_back();
        rest = &rest[i + "crate::".len()..];
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$') {
            continue;
        }
        let tail = rest.trim_start();
        if let Some(group) = tail.strip_prefix('{') {
            let mut depth = 0usize;
            let mut expect_name = true;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => expect_name = true,
                    c if expect_name && depth == 0 && !c.is_whitespace() => {
                        found.insert(ident(&group[j..]).to_string());
                        expect_name = false;
                    }
                    _ => {}
                }
            }
        } else {
            found.insert(ident(tail).to_string());
        }
    }
    found.remove("");
    found
}

/// module -> the modules it imports (self excluded), and where each edge comes from.
fn graph() -> BTreeMap<String, BTreeMap<String, String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for file in files {
        let rel = file.strip_prefix(&src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let module = first.trim_end_matches(".rs").to_string();
        if module == "lib" {
            continue;
        }
        let code = code_only(&std::fs::read_to_string(&file).unwrap());
        let edges = graph.entry(module.clone()).or_default();
        for to in imported(&code) {
            if to != module {
                edges.entry(to).or_insert_with(|| rel.display().to_string());
            }
        }
    }
    graph
}

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

/// A cycle through the graph, if there is one (depth-first search, grey/black marks).
fn find_cycle(graph: &BTreeMap<String, BTreeMap<String, String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeMap<String, String>>,
        marks: &mut BTreeMap<String, bool>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match marks.get(node) {
            Some(true) => return None,
            Some(false) => {
                let start = path.iter().position(|n| n == node).unwrap();
                let mut cycle = path[start..].to_vec();
                cycle.push(node.to_string());
                return Some(cycle);
            }
            None => {}
        }
        marks.insert(node.to_string(), false);
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flat_map(|e| e.keys()) {
            if let Some(cycle) = visit(next, graph, marks, path) {
                return Some(cycle);
            }
        }
        path.pop();
        marks.insert(node.to_string(), true);
        None
    }
    let mut marks = BTreeMap::new();
    for node in graph.keys() {
        if let Some(cycle) = visit(node, graph, &mut marks, &mut Vec::new()) {
            return Some(cycle);
        }
    }
    None
}

#[test]
fn top_level_modules_import_one_way() {
    let graph = graph();
    let mut wrong = Vec::new();
    for (from, edges) in &graph {
        let Some(low) = layer_of(from) else {
            wrong.push(format!("module `{from}` is missing from LAYERS"));
            continue;
        };
        for (to, file) in edges {
            match layer_of(to) {
                None => wrong.push(format!("{file}: `crate::{to}` is not a module in LAYERS")),
                Some(high) if high > low => wrong.push(format!(
                    "{file}: `{from}` imports `{to}`, which sits above it"
                )),
                Some(_) => {}
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports pointing up:\n{}",
        wrong.join("\n")
    );
    if let Some(cycle) = find_cycle(&graph) {
        let steps: Vec<String> = cycle
            .windows(2)
            .map(|w| format!("{} -> {} ({})", w[0], w[1], graph[&w[0]][&w[1]]))
            .collect();
        panic!("import cycle:\n{}", steps.join("\n"));
    }
}

#[test]
fn the_checker_sees_grouped_and_inline_paths() {
    let code = code_only(
        "use crate::{a::X, b, c::{d, e}};\nfn f() { crate::g::h(); } // crate::comment\n\
         const S: &str = \"crate::string }\"; const C: char = '}';\n\
         use foo_crate::z;\n#[cfg(test)]\nmod tests {\n    use crate::t;\n    fn f() {}\n}\nuse crate::after;",
    );
    let names: Vec<String> = imported(&code).into_iter().collect();
    assert_eq!(names, ["a", "after", "b", "c", "g"]);
    let mut cyclic = BTreeMap::new();
    cyclic.insert(
        "x".to_string(),
        BTreeMap::from([("y".into(), "x.rs".into())]),
    );
    cyclic.insert(
        "y".to_string(),
        BTreeMap::from([("x".into(), "y.rs".into())]),
    );
    assert_eq!(find_cycle(&cyclic).unwrap(), ["x", "y", "x"]);
}
