//! The module map in `src/lib.rs` is a rule, not a wish: its "Who may import whom" table is the
//! allowed graph, and this test reads it and every source file's `crate::` paths. A module that
//! names another one the table does not allow, a module missing from the table, or a cycle among
//! the files of one module folder fails the suite.
//!
//! Only code outside `#[cfg(test)]` counts (tests may reach anywhere); comments and doc links do
//! not count.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The table between the markers in `src/lib.rs`: module -> modules it may import.
fn allowed_graph() -> BTreeMap<String, BTreeSet<String>> {
    let lib = fs::read_to_string(Path::new(ROOT).join("src/lib.rs")).expect("read src/lib.rs");
    let mut graph = BTreeMap::new();
    let mut inside = false;
    for line in lib.lines() {
        let line = line.trim_start_matches("//!").trim();
        if line.starts_with("| module") {
            inside = true;
            continue;
        }
        if !inside || line.starts_with("|--") || line.starts_with("| --") {
            continue;
        }
        if !line.starts_with('|') {
            if !graph.is_empty() {
                break;
            }
            continue;
        }
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        assert_eq!(
            cells.len(),
            2,
            "a row of the import table has two cells: {line}"
        );
        let names = |cell: &str| -> Vec<String> {
            cell.split(',')
                .map(|s| s.trim().trim_matches('`').to_string())
                .filter(|s| !s.is_empty() && s != "—" && s != "-")
                .collect()
        };
        for module in names(cells[0]) {
            graph.insert(module, names(cells[1]).into_iter().collect());
        }
    }
    assert!(
        !graph.is_empty(),
        "src/lib.rs has no `| module | may import |` table"
    );
    graph
}

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).expect("read_dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// The source of a file without comments, string literals and `#[cfg(test)]` items.
fn code_outside_tests(source: &str) -> String {
    let mut out = String::new();
    let mut skip_depth: Option<i32> = None;
    let mut depth = 0i32;
    let mut pending_cfg_test = false;
    for line in source.lines() {
        let code = strip_comment_and_strings(line);
        let trimmed = code.trim();
        if skip_depth.is_none() && trimmed.starts_with("#[cfg(test)]") {
            pending_cfg_test = true;
            continue;
        }
        let opens = code.matches('{').count() as i32;
        let closes = code.matches('}').count() as i32;
        if pending_cfg_test && skip_depth.is_none() {
            // The item the attribute applies to: skip it whole (to its closing brace, or the
            // `;` of a one-line item).
            if opens == 0 && trimmed.ends_with(';') {
                pending_cfg_test = false;
                continue;
            }
            if opens > 0 {
                skip_depth = Some(depth);
                pending_cfg_test = false;
            }
        }
        depth += opens - closes;
        if let Some(d) = skip_depth {
            if depth <= d {
                skip_depth = None;
            }
            continue;
        }
        if !pending_cfg_test {
            out.push_str(&code);
            out.push('\n');
        }
    }
    out
}

/// One line with `//` comments and the contents of simple string literals removed.
fn strip_comment_and_strings(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars().peekable();
    let mut in_str = false;
    while let Some(c) = chars.next() {
        if in_str {
            match c {
                '\\' => {
                    chars.next();
                }
                '"' => {
                    in_str = false;
                    out.push('"');
                }
                _ => {}
            }
            continue;
        }
        match c {
            '"' => {
                in_str = true;
                out.push('"');
            }
            '/' if chars.peek() == Some(&'/') => break,
            _ => out.push(c),
        }
    }
    out
}

/// The top-level module a file belongs to (`src/cache/fill.rs` -> `cache`), and its submodule
/// (`fill`, or `mod` for the folder's `mod.rs`).
fn module_of(file: &Path) -> (String, String) {
    let rel = file
        .strip_prefix(Path::new(ROOT).join("src"))
        .expect("under src");
    let parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    match parts.as_slice() {
        [single] => (single.clone(), "mod".to_string()),
        [top, sub, ..] => (top.clone(), sub.clone()),
        [] => unreachable!("a file has a name"),
    }
}

/// The identifiers that follow `prefix` in `code` (`crate::cache::fill` -> `cache` for
/// `crate::`), including those inside `use crate::{a, b::c}` groups.
fn names_after(code: &str, prefix: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    for (at, _) in code.match_indices(prefix) {
        let before = code[..at].chars().last();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let rest = &code[at + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            // Top-level items of the group: split on commas outside nested braces.
            let mut level = 0;
            let mut start = 0;
            let inner = &group[..end.min(group.len())];
            let mut items = Vec::new();
            for (i, c) in inner.char_indices() {
                match c {
                    '{' => level += 1,
                    '}' => level -= 1,
                    ',' if level == 0 => {
                        items.push(&inner[start..i]);
                        start = i + 1;
                    }
                    _ => {}
                }
            }
            items.push(&inner[start..]);
            for item in items {
                let name = ident(item.trim());
                if !name.is_empty() {
                    found.insert(name);
                }
            }
        } else {
            let name = ident(rest);
            if !name.is_empty() {
                found.insert(name);
            }
        }
    }
    found
}

#[test]
fn every_module_imports_only_what_the_map_in_lib_rs_allows() {
    let graph = allowed_graph();
    let mut problems = Vec::new();
    for file in rust_files(&Path::new(ROOT).join("src")) {
        let (module, _) = module_of(&file);
        if module == "lib" || module == "main" || module == "bin" {
            continue;
        }
        let Some(allowed) = graph.get(&module) else {
            problems.push(format!(
                "module `{module}` is not in src/lib.rs's import table"
            ));
            continue;
        };
        let source = fs::read_to_string(&file).expect("read source");
        for used in names_after(&code_outside_tests(&source), "crate::") {
            if used == module || used == "Error" || used == "Result" {
                continue;
            }
            if !allowed.contains(&used) {
                problems.push(format!(
                    "{} (module `{module}`) imports `crate::{used}`, which the table does not allow",
                    file.strip_prefix(ROOT).unwrap_or(&file).display()
                ));
            }
        }
    }
    for (module, deps) in &graph {
        for dep in deps {
            if !graph.contains_key(dep) {
                problems.push(format!(
                    "`{module}` may import `{dep}`, which is not in the table"
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "import rule broken:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_allowed_graph_has_no_cycle() {
    let graph = allowed_graph();
    let order = topological_order(&graph);
    assert!(
        order.is_some(),
        "the import table in src/lib.rs has a cycle"
    );
}

#[test]
fn the_files_of_one_module_do_not_import_each_other_in_a_cycle() {
    let mut per_module: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for file in rust_files(&Path::new(ROOT).join("src")) {
        let (module, sub) = module_of(&file);
        if file.parent() == Some(&Path::new(ROOT).join("src")) || module == "bin" {
            continue;
        }
        let source = fs::read_to_string(&file).expect("read source");
        let code = code_outside_tests(&source);
        let mut deps = names_after(&code, &format!("crate::{module}::"));
        if sub != "mod" {
            deps.extend(names_after(&code, "super::"));
        }
        deps.remove(&sub);
        let files = per_module.entry(module).or_default();
        files.entry(sub).or_default().extend(deps);
    }
    for (module, files) in per_module {
        // Names that are not files of the folder (items of mod.rs) are edges to `mod`.
        let graph: BTreeMap<String, BTreeSet<String>> = files
            .iter()
            .map(|(sub, deps)| {
                let deps = deps
                    .iter()
                    .map(|d| {
                        if files.contains_key(d) {
                            d.clone()
                        } else {
                            "mod".to_string()
                        }
                    })
                    .filter(|d| d != sub && d != "mod")
                    .collect();
                (sub.clone(), deps)
            })
            .collect();
        assert!(
            topological_order(&graph).is_some(),
            "the files of `{module}` import each other in a cycle: {graph:?}"
        );
    }
}

/// Kahn's algorithm over "a imports b" edges; `None` when there is a cycle.
fn topological_order(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    let mut remaining: BTreeMap<&String, BTreeSet<&String>> = graph
        .iter()
        .map(|(m, deps)| (m, deps.iter().filter(|d| graph.contains_key(*d)).collect()))
        .collect();
    let mut order = Vec::new();
    while !remaining.is_empty() {
        let ready: Vec<&String> = remaining
            .iter()
            .filter(|(_, deps)| deps.is_empty())
            .map(|(m, _)| *m)
            .collect();
        if ready.is_empty() {
            return None;
        }
        for m in ready {
            remaining.remove(m);
            for deps in remaining.values_mut() {
                deps.remove(m);
            }
            order.push(m.clone());
        }
    }
    Some(order)
}

#[test]
fn the_reader_sees_through_groups_comments_and_test_modules() {
    let code = code_outside_tests(
        "use crate::{oci::Digest, cache::{Cache, fill}};\n\
         // use crate::admin;\n\
         let s = \"crate::http\";\n\
         fn f() { crate::metrics::metrics(); }\n\
         #[cfg(test)]\n\
         mod tests {\n    use crate::server;\n    fn g() {}\n}\n\
         fn after() { crate::policy::x(); }\n",
    );
    let names = names_after(&code, "crate::");
    let expected: BTreeSet<String> = ["oci", "cache", "metrics", "policy"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(names, expected);
}
