//! Finds `${` where the parser does not expand it: in quoted and block
//! values, and in keys. Such a reference would otherwise stay in the value
//! as text (a client secret that reads `${SECRET}`), so it is refused.
//!
//! serde-saphyr expands quoted values only in its Docker Compose mode, which
//! also turns an unset `${NAME}` into an empty string and expands a bare
//! `$NAME` (changing a secret such as `pa$word`); refusing keeps `${NAME}`
//! strict and every other `$` literal.

use serde_saphyr::granit_parser::{Event, Parser, ScalarStyle};

use super::Problem;

/// The refusal for a quoted or block value.
const QUOTED: &str = "`${` is not expanded inside a quoted or block value; write the \
                      value unquoted (`key: ${NAME}`), or `$${` unquoted for the literal text";

/// The refusal for a key.
const KEY: &str = "`${` is not expanded in a key; keys are taken as written";

/// Where the walk is: inside a mapping or a sequence.
enum Frame {
    /// A mapping, with the key whose value comes next (none while a key
    /// is expected).
    Map { key: Option<String> },
    /// A sequence, with the index of the next item.
    Seq { next: usize },
}

/// Every `${` that the parser leaves as text, with its line and key path
/// (`provider.introspection.client_secret`, `routes[2].name`).
///
/// A file that does not parse gives no problems here: the deserializer
/// reports its syntax error with a line.
pub(super) fn unexpanded_references(text: &str) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut stack: Vec<Frame> = Vec::new();
    let mut parser = Parser::new_from_str(text);

    while let Some(Ok((event, span))) = parser.next_event() {
        let line = u64::try_from(span.start.line()).ok();

        // A scalar in a mapping that expects a key is that key.
        if let (Event::Scalar(value, ..), Some(Frame::Map { key: key @ None })) =
            (&event, stack.last_mut())
        {
            *key = Some(value.to_string());
            if value.contains("${") {
                problems.push(problem(line, &stack, KEY));
            }
            continue;
        }

        match event {
            Event::Scalar(value, style, ..) => {
                if style != ScalarStyle::Plain && value.contains("${") {
                    problems.push(problem(line, &stack, QUOTED));
                }
                value_done(&mut stack);
            }
            Event::Alias(..) => value_done(&mut stack),
            Event::MappingStart(..) => stack.push(Frame::Map { key: None }),
            Event::SequenceStart(..) => stack.push(Frame::Seq { next: 0 }),
            Event::MappingEnd | Event::SequenceEnd => {
                stack.pop();
                value_done(&mut stack);
            }
            _ => {}
        }
    }

    problems
}

/// After a whole value: the mapping expects its next key, the sequence its
/// next item. A mapping used as a key (rare) takes the text `?` as its key.
fn value_done(stack: &mut [Frame]) {
    match stack.last_mut() {
        Some(Frame::Map { key: key @ Some(_) }) => *key = None,
        Some(Frame::Map { key }) => *key = Some("?".to_owned()),
        Some(Frame::Seq { next }) => *next += 1,
        None => {}
    }
}

fn problem(line: Option<u64>, stack: &[Frame], message: &str) -> Problem {
    Problem {
        line: line.filter(|line| *line > 0),
        key: key_path(stack),
        message: message.to_owned(),
    }
}

/// The path to the node being read, in the form the deserializer's errors
/// use.
fn key_path(stack: &[Frame]) -> String {
    let mut path = String::new();

    for frame in stack {
        match frame {
            Frame::Map { key: Some(key) } => {
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(key);
            }
            Frame::Map { key: None } => {}
            Frame::Seq { next } => path.push_str(&format!("[{next}]")),
        }
    }

    if path.is_empty() {
        "(top level)".to_owned()
    } else {
        path
    }
}
