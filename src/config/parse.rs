//! Reading the YAML into the file's types, with `${VAR}` expanded, and
//! turning the parser's errors into problems that name the key and say what
//! is wrong in words a reader of the file knows.

use std::collections::HashMap;
use std::path::Path;

use serde_saphyr::Options;
use serde_saphyr::budget::{Budget, BudgetBreach};

use super::file::FileConfig;
use super::unexpanded::{self, Expanded};
use super::{ConfigError, Problem};

/// The most nodes (mappings, lists and values, aliases expanded) a file
/// may hold; the shipped file has under a thousand.
const MAX_NODES: usize = 250_000;

/// The deepest nesting a file may have.
const MAX_DEPTH: usize = 64;

/// The most aliases (`*name`) a file may use.
const MAX_ALIASES: usize = 10_000;

/// What the parser's redaction writes instead of text it cannot place: it
/// hides a resolved `${VAR}` from messages, and in a file that expands one
/// it also hides keys and values that were never expanded.
const REDACTED: [&str; 5] = [
    "an interpolated field",
    "an interpolated variant",
    "an interpolated value",
    "invalid interpolated scalar value",
    "invalid interpolated value",
];

/// An expanded value at least this long is kept out of every message, not
/// only out of those about its own line: it may be a secret.
const SECRET_CHARS: usize = 8;

/// Deserializes the file, expanding `${VAR}` and `${VAR:-default}` inside
/// plain scalar values only, so that a variable can never add keys.
pub(super) fn parse(
    path: &Path,
    text: &str,
    env: HashMap<String, String>,
) -> Result<FileConfig, ConfigError> {
    let options = options().with_properties(env.clone());

    let problem = match deserialize(text, options) {
        Ok(raw) => return Ok(raw),
        Err(problem) => problem,
    };
    let problem = if REDACTED
        .iter()
        .any(|hidden| problem.message.contains(hidden))
    {
        unredacted(text, &env, &problem).unwrap_or(problem)
    } else {
        problem
    };

    Err(ConfigError::Invalid {
        path: path.to_owned(),
        problems: vec![problem],
    })
}

/// The parser's settings: YAML 1.2 booleans only, numbers only in YAML 1.2
/// spellings (so `2_0` and `020` are strings), and limits a hostile
/// file (an alias bomb, deep nesting) meets long before memory runs out.
fn options() -> Options {
    let mut budget = Budget::default();
    budget.max_nodes = MAX_NODES;
    budget.max_depth = MAX_DEPTH;
    budget.max_aliases = MAX_ALIASES;

    let mut options = Options::default();
    options.budget = Some(budget);
    options.strict_booleans = true;
    options.underscored_numbers_as_strings = true;
    options.leading_zero_numbers_as_strings = true;
    options
}

/// One pass of the deserializer; an error becomes its problem.
fn deserialize(text: &str, options: Options) -> Result<FileConfig, Problem> {
    let mut key = String::new();

    let result = serde_saphyr::with_deserializer_from_str_with_options(text, options, |de| {
        serde_path_to_error::deserialize(de).map_err(|err| {
            key = err.path().to_string();
            err.into_inner()
        })
    });

    result.map_err(|err| describe(text, &err, &key))
}

/// The problem for one parser error: its line, the key (as problems name
/// keys elsewhere) and a sentence.
fn describe(text: &str, err: &serde_saphyr::Error, path: &str) -> Problem {
    let location = err.location();
    let line = location
        .map(|location| location.line())
        .filter(|line| *line > 0);

    // Spanned values add a `value` step to serde's path, and an unknown
    // step is `?`; readers never wrote either.
    let key = path.replace(".value[", "[").replace(".value.", ".");
    let key = key.strip_suffix(".value").map(str::to_owned).unwrap_or(key);
    let key = key.strip_suffix(".?").map(str::to_owned).unwrap_or(key);
    let mut key = if key.is_empty() || key == "." || key == "?" {
        "(top level)".to_owned()
    } else {
        key
    };

    // serde cannot name a key it did not read as a string (a policy's name
    // read with its place, `?`) or one it had not reached yet (the key of a
    // value whose variable is unset): the node at the error's place names it.
    let unnamed = key.split(['.', '[']).any(|step| step == "?");
    if (unnamed || is_variable_error(innermost(err)))
        && let Some(location) = location
        && let Some(found) = unexpanded::key_at(
            text,
            location.line(),
            location.column(),
            matches!(
                innermost(err),
                serde_saphyr::Error::SerdeMissingField { .. }
            ),
        )
    {
        key = found;
    }

    let message = match sentence(innermost(err), &mut key) {
        Some(sentence) => sentence,
        None => first_line(&err.to_string()),
    };

    Problem { line, key, message }
}

/// The error itself, inside the wrappers that add source snippets and alias
/// locations.
fn innermost(err: &serde_saphyr::Error) -> &serde_saphyr::Error {
    match err {
        serde_saphyr::Error::WithSnippet { error, .. }
        | serde_saphyr::Error::AliasError { error, .. } => innermost(error),
        other => other,
    }
}

fn is_variable_error(err: &serde_saphyr::Error) -> bool {
    use serde_saphyr::Error as E;

    matches!(
        err,
        E::UnresolvedProperty { .. }
            | E::InvalidPropertyName { .. }
            | E::PropertyRequiredButUnset { .. }
            | E::PropertyRequiredButEmpty { .. }
    )
}

/// A sentence for the errors whose own text speaks of the parser's API or
/// internals; `None` keeps the parser's text. May shorten `key` to the key
/// the sentence is about.
fn sentence(err: &serde_saphyr::Error, key: &mut String) -> Option<String> {
    use serde_saphyr::Error as E;

    let text = match err {
        E::DuplicateMappingKey {
            key: Some(name), ..
        } => format!("duplicate key `{name}`"),
        E::DuplicateMappingKey { key: None, .. } => "duplicate key".to_owned(),
        E::ExpectedMappingEndAfterEnumVariantValue { .. } if is_step(key) => {
            // The path ends at the step's first operation; the step is at fault.
            if let Some((step, _)) = key.rsplit_once('.') {
                *key = step.to_owned();
            }
            "a step has exactly one operation; write each as its own `- op: ...` item".to_owned()
        }
        E::ExpectedMappingEndAfterEnumVariantValue { .. } => {
            "expected a mapping with exactly one key here".to_owned()
        }
        E::Budget { breach, .. } => over_budget(breach),
        E::AliasReplayLimitExceeded {
            max_total_replayed_events,
            ..
        } => format!(
            "the aliases expand to too much: at most {max_total_replayed_events} nodes may come \
             from aliases"
        ),
        E::AliasExpansionLimitExceeded {
            max_expansions_per_anchor,
            ..
        } => format!("an anchor is used more than {max_expansions_per_anchor} times"),
        E::AliasReplayStackDepthExceeded { max_depth, .. } => {
            format!("aliases nest more than {max_depth} deep")
        }
        E::MultipleDocuments { .. } => {
            "the file holds more than one YAML document (`---`); a configuration is one".to_owned()
        }
        E::UnresolvedProperty { name, .. } => {
            format!("environment variable `{name}` is not set and the reference has no default")
        }
        E::PropertyRequiredButUnset { name, message, .. } => {
            unset_sentence(name, "is not set", message)
        }
        E::PropertyRequiredButEmpty { name, message, .. } => {
            unset_sentence(name, "is empty", message)
        }
        E::InvalidPropertyName { name, .. } => format!(
            "`{name}` is not a reference: a name starts with a letter or `_` and holds only \
             letters, digits and `_` (write `$${{` for the literal text)"
        ),
        _ => return None,
    };
    Some(text)
}

/// Whether `key` is inside a profile's steps (`profiles.P.routes.R[i].op`).
fn is_step(key: &str) -> bool {
    key.starts_with("profiles.") && key.contains(".routes.") && key.contains('[')
}

fn unset_sentence(name: &str, what: &str, message: &str) -> String {
    if message.is_empty() {
        format!("environment variable `{name}` {what}")
    } else {
        format!("environment variable `{name}` {what}: {message}")
    }
}

/// The limit a file went past, in the file's own terms.
fn over_budget(breach: &BudgetBreach) -> String {
    match breach {
        BudgetBreach::Nodes { .. } => {
            format!("the file has too many nodes (aliases expanded); at most {MAX_NODES}")
        }
        BudgetBreach::Depth { .. } => {
            format!("the file nests too deep; at most {MAX_DEPTH} levels")
        }
        BudgetBreach::Aliases { .. } => {
            format!("the file uses too many aliases; at most {MAX_ALIASES}")
        }
        BudgetBreach::AliasAnchorRatio { .. } => {
            "the file uses its anchors through far more aliases than a configuration needs"
                .to_owned()
        }
        BudgetBreach::Documents { .. } => {
            "the file holds more than one YAML document (`---`); a configuration is one".to_owned()
        }
        _ => "the file is larger or more complex than any configuration needs".to_owned(),
    }
}

/// serde-saphyr's messages start with `error: line L column C: ` and carry a
/// source snippet after the first line; the file and line are reported
/// separately, so only the sentence is kept.
fn first_line(message: &str) -> String {
    let line = message.lines().next().unwrap_or_default().trim();
    let line = line.strip_prefix("error: ").unwrap_or(line);

    match line.split_once(": ") {
        Some((position, rest)) if position.starts_with("line ") => rest.to_owned(),
        _ => line.to_owned(),
    }
}

// === messages the redaction hid ===

/// The same error with the key or value the parser's redaction hid.
///
/// The file is read a second time with every expanded value replaced by
/// its expansion, written as a literal, so that nothing is expanded and
/// nothing hidden. The second error counts only if it is found on the same
/// line; in its text, the expansion of each value on that line (and any
/// long one, which may be a secret) is put back as it was written.
fn unredacted(text: &str, env: &HashMap<String, String>, first: &Problem) -> Option<Problem> {
    let expanded = unexpanded::scan(text).expanded;
    let mut literal = text.to_owned();
    let mut shown: Vec<(&Expanded, String)> = Vec::with_capacity(expanded.len());

    // From the end, so that earlier ranges stay where they are.
    for value in expanded.iter().rev() {
        let expansion = expand(&value.text, env)?;
        let written = literal.get(value.range.clone())?;
        let breaks = "\n".repeat(written.matches('\n').count());
        literal.replace_range(
            value.range.clone(),
            &format!("{}{breaks}", as_literal(&expansion)),
        );
        shown.push((value, expansion));
    }

    let second = match deserialize(&literal, options()) {
        Ok(_) => return None,
        Err(second) => second,
    };
    if second.line != first.line {
        return None;
    }

    // serde quotes a string value with `{:?}` and other values in backticks.
    let mut message = second.message;
    shown.sort_by_key(|(_, expansion)| std::cmp::Reverse(expansion.len()));
    for (value, expansion) in shown.into_iter().filter(|(_, e)| !e.is_empty()) {
        if Some(value.line) == second.line {
            let (quoted, ticked) = (format!("{expansion:?}"), format!("`{expansion}`"));
            message = message
                .replace(&quoted, &format!("{:?}", value.text))
                .replace(&ticked, &format!("`{}`", value.text));
        }
        if expansion.chars().count() >= SECRET_CHARS {
            message = message.replace(&expansion, &value.text);
        }
    }
    Some(Problem {
        line: second.line,
        key: second.key,
        message,
    })
}

/// What the parser makes of one plain value, as a string.
fn expand(value: &str, env: &HashMap<String, String>) -> Option<String> {
    let mut options = options().with_properties(env.clone());
    options.null_as_string = true;

    serde_saphyr::from_str_with_options::<String>(value, options).ok()
}

/// `value` as a YAML scalar that reads back as exactly that text, in any
/// place a plain value may stand: plain when that is unambiguous (so that
/// numbers and booleans keep their type), double-quoted otherwise.
fn as_literal(value: &str) -> String {
    if reads_back_plain(value) {
        value.to_owned()
    } else {
        serde_json::Value::String(value.to_owned()).to_string()
    }
}

/// Letters, digits and `._/+-:@`, starting with a letter or digit (or with
/// `+-./` before more text), and not ending in `:`.
fn reads_back_plain(value: &str) -> bool {
    let mut chars = value.chars();
    let Some(first) = chars.next() else {
        return false;
    };

    let starts =
        first.is_ascii_alphanumeric() || ("+-./".contains(first) && !chars.as_str().is_empty());
    let plain_char = |c: char| c.is_ascii_alphanumeric() || "._/+-:@".contains(c);
    starts && value.chars().all(plain_char) && !value.ends_with(':')
}
