//! Finds `${` where the parser does not expand it: in quoted and block
//! values, in keys, and a `${` never closed. Such a reference would
//! otherwise stay in the value as text (a client secret that reads
//! `${SECRET}`), so it is refused.
//!
//! serde-saphyr expands quoted values only in its Docker Compose mode, which
//! also turns an unset `${NAME}` into an empty string and expands a bare
//! `$NAME` (changing a secret such as `pa$word`); refusing keeps `${NAME}`
//! strict and every other `$` literal.
//!
//! The same walk lists the plain values the parser does expand, with their
//! places and keys, for the messages about them.

use std::ops::Range;

use serde_saphyr::granit_parser::{Event, Parser, ScalarStyle};

use super::Problem;

/// The refusal for a quoted or block value.
const QUOTED: &str = "`${` is not expanded inside a quoted or block value; write the \
                      value unquoted (`key: ${NAME}`), or `$${` unquoted for the literal text";

/// The refusal for a key.
const KEY: &str = "`${` is not expanded in a key; keys are taken as written";

/// The refusal for a reference without its closing brace.
const UNCLOSED: &str = "`${` is not closed, so it would be kept as text; write `${NAME}`, \
                        or `$${` for the literal text";

/// A plain value that the parser expands (it holds a `$`).
pub(super) struct Expanded {
    /// Its bytes in the file.
    pub range: Range<usize>,
    /// Its 1-based line.
    pub line: u64,
    /// The value as the parser read it, before expansion.
    pub text: String,
}

/// What one walk over the file found.
pub(super) struct Scan {
    /// Every `${` left as text.
    pub problems: Vec<Problem>,
    /// Every plain value with a `$`, in file order.
    pub expanded: Vec<Expanded>,
}

/// Where the walk is: inside a mapping or a sequence.
enum Frame {
    /// A mapping, with the key whose value comes next (none while a key
    /// is expected).
    Map { key: Option<String> },
    /// A sequence, with the index of the next item.
    Seq { next: usize },
}

/// Every `${` that the parser leaves as text, with its line and key path
/// (`provider.introspection.client_secret`, `routes[2].name`), and every
/// plain value it expands.
///
/// A file that does not parse gives no problems here: the deserializer
/// reports its syntax error with a line.
pub(super) fn scan(text: &str) -> Scan {
    let mut problems = Vec::new();
    let mut expanded = Vec::new();
    let mut stack: Vec<Frame> = Vec::new();
    let mut parser = Parser::new_from_str(text);

    while let Some(Ok((event, span))) = parser.next_event() {
        let line = u64::try_from(span.start.line()).ok();

        if let Some(key) = take_key(&mut stack, &event) {
            if key.contains("${") {
                problems.push(problem(line, &stack, KEY));
            }
            continue;
        }

        if let Event::Scalar(value, style, ..) = &event {
            if *style != ScalarStyle::Plain && value.contains("${") {
                problems.push(problem(line, &stack, QUOTED));
            }
            if *style == ScalarStyle::Plain && value.contains('$') {
                if unclosed(value) {
                    problems.push(problem(line, &stack, UNCLOSED));
                }
                if let (Some(range), Some(line)) = (span.byte_range(), line) {
                    expanded.push(Expanded {
                        range,
                        line,
                        text: value.to_string(),
                    });
                }
            }
        }
        advance(&mut stack, &event);
    }

    Scan { problems, expanded }
}

/// The key path of the node that starts at `line` and `column` (1-based,
/// as the parser's errors count): a key names itself, a value its key.
/// Where a mapping and its first key start together, the key is meant,
/// unless `whole` asks for the mapping.
pub(super) fn key_at(text: &str, line: u64, column: u64, whole: bool) -> Option<String> {
    let mut stack: Vec<Frame> = Vec::new();
    let mut parser = Parser::new_from_str(text);
    let mut collection = None;

    while let Some(Ok((event, span))) = parser.next_event() {
        let here = u64::try_from(span.start.line()).ok() == Some(line)
            && u64::try_from(span.start.col()).ok().map(|col| col + 1) == Some(column);
        if !here && collection.is_some() {
            return collection;
        }

        if take_key(&mut stack, &event).is_some() {
            if here {
                return Some(key_path(&stack));
            }
            continue;
        }
        match event {
            Event::MappingStart(..) | Event::SequenceStart(..) if here && whole => {
                return Some(key_path(&stack));
            }
            Event::MappingStart(..) | Event::SequenceStart(..) if here => {
                collection = Some(key_path(&stack));
            }
            Event::Scalar(..) | Event::Alias(..) if here => return Some(key_path(&stack)),
            _ => {}
        }
        advance(&mut stack, &event);
    }
    None
}

/// A scalar read where a mapping expects its next key is that key: records
/// it on the stack and returns it. Any other event gives `None`.
fn take_key(stack: &mut [Frame], event: &Event<'_>) -> Option<String> {
    let (Event::Scalar(value, ..), Some(Frame::Map { key: key @ None })) =
        (event, stack.last_mut())
    else {
        return None;
    };
    *key = Some(value.to_string());
    key.clone()
}

/// Moves the stack past a value or a collection's start or end.
fn advance(stack: &mut Vec<Frame>, event: &Event<'_>) {
    match event {
        Event::Scalar(..) | Event::Alias(..) => value_done(stack),
        Event::MappingStart(..) => stack.push(Frame::Map { key: None }),
        Event::SequenceStart(..) => stack.push(Frame::Seq { next: 0 }),
        Event::MappingEnd | Event::SequenceEnd => {
            stack.pop();
            value_done(stack);
        }
        _ => {}
    }
}

/// Whether a `${` in a plain value has no closing `}`: the parser keeps such
/// text as it is. `$$` is the escape for `$`, and defaults nest
/// (`${A:-${B}}`).
fn unclosed(value: &str) -> bool {
    let bytes = value.as_bytes();
    let mut open = 0_usize;
    let mut index = 0;

    while index < bytes.len() {
        match (bytes[index], bytes.get(index + 1)) {
            (b'$', Some(b'$')) => index += 2,
            (b'$', Some(b'{')) => {
                open += 1;
                index += 2;
            }
            (b'}', _) if open > 0 => {
                open -= 1;
                index += 1;
            }
            _ => index += 1,
        }
    }
    open > 0
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
