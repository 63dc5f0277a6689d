//! `docs/first-service.md` shows this crate's code, not a copy of it that could rot:
//!
//! - every ```` ```rust ```` block starts with a marker line naming a file of this crate,
//!   `// examples/library/src/member.rs`, and the rest of the block must appear in that
//!   file verbatim, as consecutive lines (trailing whitespace aside). The file is
//!   compiled and tested, so the guide's code is too.
//! - the ```` ```toml ```` block marked `# examples/library/Cargo.toml` must name the
//!   dependencies this crate has, with the same versions, `default-features` and
//!   features (the workspace's entries resolved from the root `Cargo.toml`), so that a
//!   crate made from the guide builds what this one builds.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use similar::{ChangeTag, TextDiff};

const GUIDE: &str = "docs/first-service.md";
const CRATE_DIR: &str = "examples/library/";

/// Dev-dependencies of this crate that the guide leaves out: only this check uses them.
const CHECK_ONLY: &[&str] = &["similar", "toml"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

/// A fenced block of the guide.
#[derive(Debug)]
struct Block {
    /// The fence's info string: `rust`, `toml`, `sh`, ...
    lang: String,
    /// The line of the opening fence, from 1.
    line: usize,
    /// The lines between the fences.
    lines: Vec<String>,
}

impl Block {
    fn name(&self) -> String {
        format!(
            "the ```{} block at {GUIDE}:{} ({})",
            self.lang,
            self.line,
            self.lines.first().map_or("empty", String::as_str)
        )
    }

    /// The file its marker line names, if it has one: `<comment> examples/library/...`.
    fn marked_file(&self, comment: &str) -> Option<&str> {
        let first = self.lines.first()?.trim();
        let path = first.strip_prefix(comment)?.trim();
        path.starts_with(CRATE_DIR).then_some(path)
    }
}

fn blocks(markdown: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut open: Option<(Block, usize)> = None;
    for (i, line) in markdown.lines().enumerate() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        match open.take() {
            None => {
                if let Some(info) = trimmed.strip_prefix("```") {
                    let lang = info.split([',', ' ']).next().unwrap_or_default();
                    let block = Block {
                        lang: lang.to_owned(),
                        line: i + 1,
                        lines: Vec::new(),
                    };
                    open = Some((block, indent));
                }
            }
            Some((block, _)) if trimmed.starts_with("```") => blocks.push(block),
            Some((mut block, indent)) => {
                let unindented = line.get(indent..).unwrap_or(line.trim_start());
                block.lines.push(unindented.trim_end().to_owned());
                open = Some((block, indent));
            }
        }
    }
    assert!(open.is_none(), "{GUIDE} has a fence that is not closed");
    blocks
}

#[test]
fn every_rust_block_of_the_guide_is_code_of_the_example() {
    let blocks = blocks(&read(GUIDE));
    let rust: Vec<&Block> = blocks
        .iter()
        .filter(|b| matches!(b.lang.as_str(), "rust" | "rs"))
        .collect();
    assert!(
        rust.len() >= 10,
        "{GUIDE} has {} ```rust blocks; expected the guide's code (is the parser broken?)",
        rust.len()
    );
    let mut failures = String::new();
    for block in rust {
        let Some(path) = block.marked_file("//") else {
            let _ = writeln!(
                failures,
                "{} has no marker line: its first line must name the file it comes from, \
                 `// {CRATE_DIR}src/<file>.rs`\n",
                block.name()
            );
            continue;
        };
        let file: Vec<String> = read(path)
            .lines()
            .map(|line| line.trim_end().to_owned())
            .collect();
        let code = &block.lines[1..];
        if code.is_empty() {
            let _ = writeln!(failures, "{} has no code\n", block.name());
            continue;
        }
        if !file.windows(code.len()).any(|window| window == code) {
            let _ = writeln!(
                failures,
                "{} is not in {path} as it is (- the guide, + the closest lines of the file):\n{}",
                block.name(),
                closest_diff(code, &file)
            );
        }
    }
    assert!(
        failures.is_empty(),
        "{GUIDE} shows code that the example does not have. Change the example's file, \
         then copy the lines into the guide.\n\n{failures}"
    );
}

/// A line diff of `code` against the lines of `file` that resemble it most.
fn closest_diff(code: &[String], file: &[String]) -> String {
    let code_text = code.join("\n") + "\n";
    let window_text =
        |start: usize| file[start..(start + code.len()).min(file.len())].join("\n") + "\n";
    let best = (0..file.len().max(1))
        .max_by(|&a, &b| {
            let ratio = |start| TextDiff::from_lines(&code_text, &window_text(start)).ratio();
            ratio(a).total_cmp(&ratio(b))
        })
        .unwrap_or(0);
    let window = if file.is_empty() {
        String::new()
    } else {
        window_text(best)
    };
    let mut out = String::new();
    for change in TextDiff::from_lines(&code_text, &window).iter_all_changes() {
        let sign = match change.tag() {
            ChangeTag::Delete => "-",
            ChangeTag::Insert => "+",
            ChangeTag::Equal => " ",
        };
        let _ = write!(out, "{sign} {change}");
    }
    out
}

/// A dependency as the guide must show it: version requirement and features.
#[derive(Debug)]
struct Dependency {
    version: String,
    default_features: bool,
    features: BTreeSet<String>,
}

fn default_features(entry: &toml::Value) -> bool {
    entry
        .get("default-features")
        .and_then(toml::Value::as_bool)
        .unwrap_or(true)
}

/// The features an entry names itself.
fn features(entry: &toml::Value) -> BTreeSet<String> {
    entry
        .get("features")
        .and_then(toml::Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|feature| feature.as_str().map(str::to_owned))
        .collect()
}

fn version(entry: &toml::Value) -> Option<&str> {
    match entry {
        toml::Value::String(version) => Some(version),
        table => table.get("version").and_then(toml::Value::as_str),
    }
}

/// An entry of a `[dependencies]` table, with `workspace = true` resolved.
fn dependency(entry: &toml::Value, workspace: &toml::Table, name: &str) -> Dependency {
    if entry.get("workspace").and_then(toml::Value::as_bool) != Some(true) {
        return Dependency {
            version: version(entry)
                .unwrap_or_else(|| panic!("`{name}` has no version"))
                .to_owned(),
            default_features: default_features(entry),
            features: features(entry),
        };
    }
    let inherited = workspace
        .get("workspace")
        .and_then(|w| w.get("dependencies"))
        .and_then(|d| d.get(name))
        .unwrap_or_else(|| panic!("`{name}` is not in [workspace.dependencies]"));
    let mut all = features(inherited);
    all.extend(features(entry));
    Dependency {
        // `=0.9.0` pins the workspace's own crates; a crate of its own asks for `0.9`.
        version: version(inherited)
            .unwrap_or_else(|| panic!("`{name}` has no version in the workspace"))
            .trim_start_matches('=')
            .to_owned(),
        default_features: default_features(inherited),
        features: all,
    }
}

#[test]
fn the_guides_cargo_toml_has_the_examples_dependencies() {
    let blocks = blocks(&read(GUIDE));
    let marked: Vec<&Block> = blocks
        .iter()
        .filter(|b| b.lang == "toml" && b.marked_file("#").is_some())
        .collect();
    assert_eq!(
        marked.len(),
        1,
        "{GUIDE} must have one ```toml block marked `# {CRATE_DIR}Cargo.toml`"
    );
    let block = marked[0];
    let guide: toml::Table = block.lines[1..]
        .join("\n")
        .parse()
        .unwrap_or_else(|e| panic!("{} is not TOML: {e}", block.name()));
    let example: toml::Table = read(&format!("{CRATE_DIR}Cargo.toml"))
        .parse()
        .expect("the example's Cargo.toml");
    let workspace: toml::Table = read("Cargo.toml").parse().expect("the root Cargo.toml");

    let mut failures = String::new();
    for section in ["dependencies", "dev-dependencies"] {
        let table = |manifest: &toml::Table| {
            manifest
                .get(section)
                .and_then(toml::Value::as_table)
                .cloned()
                .unwrap_or_default()
        };
        let (shown, used) = (table(&guide), table(&example));
        let used_names: BTreeSet<&str> = used
            .keys()
            .map(String::as_str)
            .filter(|name| section == "dependencies" || !CHECK_ONLY.contains(name))
            .collect();
        let shown_names: BTreeSet<&str> = shown.keys().map(String::as_str).collect();
        for missing in used_names.difference(&shown_names) {
            let _ = writeln!(
                failures,
                "[{section}] `{missing}` is used by the example, not shown"
            );
        }
        for extra in shown_names.difference(&used_names) {
            let _ = writeln!(
                failures,
                "[{section}] `{extra}` is shown, not used by the example"
            );
        }
        for name in used_names.intersection(&shown_names) {
            let expected = dependency(&used[*name], &workspace, name);
            let actual = dependency(&shown[*name], &workspace, name);
            // `0.9` in the guide for `=0.9.0` here; otherwise the same requirement.
            let same_version = expected.version == actual.version
                || expected
                    .version
                    .starts_with(&format!("{}.", actual.version));
            if !same_version {
                let _ = writeln!(
                    failures,
                    "[{section}] `{name}`: the guide asks for {:?}, the example uses {:?}",
                    actual.version, expected.version
                );
            }
            if actual.default_features != expected.default_features {
                let _ = writeln!(
                    failures,
                    "[{section}] `{name}`: the guide has default-features = {}, the example {}",
                    actual.default_features, expected.default_features
                );
            }
            if !actual.features.is_subset(&expected.features)
                || !features(&used[*name]).is_subset(&actual.features)
            {
                let _ = writeln!(
                    failures,
                    "[{section}] `{name}`: the guide enables the features {:?}; the example \
                     enables {:?} (every one it names itself must be shown, and no other)",
                    actual.features, expected.features
                );
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} does not match {CRATE_DIR}Cargo.toml:\n{failures}",
        block.name()
    );
}
