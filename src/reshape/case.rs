//! Key style conversion for the `case` step. Only ASCII letters change, so
//! converting an already converted key gives it back unchanged.

/// `batterySoc` → `battery_soc`, `HTTPStatus` → `http_status`.
///
/// An underscore goes before an uppercase letter that starts a new word:
/// after a lowercase letter or digit, or ending a run of capitals.
pub(crate) fn to_snake(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    let mut out = String::with_capacity(key.len() + 4);

    for (i, &c) in chars.iter().enumerate() {
        if !c.is_ascii_uppercase() {
            out.push(c);
            continue;
        }

        let prev = i.checked_sub(1).map(|p| chars[p]);
        let next = chars.get(i + 1).copied();
        let starts_word = match prev {
            None | Some('_') => false,
            Some(p) if p.is_ascii_lowercase() || p.is_ascii_digit() => true,
            Some(p) => p.is_ascii_uppercase() && next.is_some_and(|n| n.is_ascii_lowercase()),
        };
        if starts_word {
            out.push('_');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

/// `battery_soc` → `batterySoc`, `line_1` → `line1`.
///
/// An underscore is removed when it follows another character and precedes
/// a lowercase letter (uppercased) or a digit. Leading underscores, as in
/// `_id`, and doubled ones stay, since they carry meaning of their own.
pub(crate) fn to_camel(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    let mut out = String::with_capacity(key.len());
    let mut upper_next = false;

    for (i, &c) in chars.iter().enumerate() {
        if upper_next {
            out.push(c.to_ascii_uppercase());
            upper_next = false;
            continue;
        }

        let joins = c == '_'
            && i > 0
            && chars[i - 1] != '_'
            && chars
                .get(i + 1)
                .is_some_and(|n| n.is_ascii_lowercase() || n.is_ascii_digit());
        if joins {
            upper_next = true;
        } else {
            out.push(c);
        }
    }
    out
}
