//! A minimal JSON reader, enough for `walvault info --json` and
//! `pgbackrest info --output=json` (the benchmark crate has no serde).

use anyhow::{Result, bail};

/// A parsed JSON value. Numbers keep their text, so that 64-bit integers
/// round-trip exactly.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `null`.
    Null,
    /// `true` or `false`.
    Bool(bool),
    /// A number, as written.
    Num(String),
    /// A string, unescaped.
    Str(String),
    /// An array.
    Arr(Vec<Value>),
    /// An object, in the order written.
    Obj(Vec<(String, Value)>),
}

impl Value {
    /// The member `key` of an object.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Obj(members) => members.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// The elements of an array.
    pub fn array(&self) -> Option<&[Value]> {
        match self {
            Value::Arr(v) => Some(v),
            _ => None,
        }
    }

    /// A string's contents.
    pub fn str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// A non-negative integer.
    pub fn u64(&self) -> Option<u64> {
        match self {
            Value::Num(n) => n.parse().ok(),
            _ => None,
        }
    }
}

/// Parses one JSON document (surrounding white space allowed).
pub fn parse(text: &str) -> Result<Value> {
    let mut p = Parser { s: text.as_bytes(), i: 0 };
    let v = p.value()?;
    p.ws();
    if p.i != p.s.len() {
        bail!("unexpected '{}' after the JSON value at byte {}", char::from(p.s[p.i]), p.i);
    }
    Ok(v)
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while self.s.get(self.i).is_some_and(u8::is_ascii_whitespace) {
            self.i += 1;
        }
    }

    fn peek(&mut self) -> Result<u8> {
        self.ws();
        match self.s.get(self.i) {
            Some(&c) => Ok(c),
            None => bail!("JSON ends too early"),
        }
    }

    fn expect(&mut self, c: u8) -> Result<()> {
        if self.peek()? != c {
            bail!("expected '{}' at byte {} of the JSON", char::from(c), self.i);
        }
        self.i += 1;
        Ok(())
    }

    fn literal(&mut self, word: &str, v: Value) -> Result<Value> {
        if !self.s[self.i..].starts_with(word.as_bytes()) {
            bail!("bad literal at byte {} of the JSON", self.i);
        }
        self.i += word.len();
        Ok(v)
    }

    fn value(&mut self) -> Result<Value> {
        match self.peek()? {
            b'{' => {
                self.i += 1;
                let mut members = Vec::new();
                if self.peek()? == b'}' {
                    self.i += 1;
                    return Ok(Value::Obj(members));
                }
                loop {
                    self.expect(b'"')?;
                    let k = self.string()?;
                    self.expect(b':')?;
                    members.push((k, self.value()?));
                    match self.peek()? {
                        b',' => self.i += 1,
                        b'}' => {
                            self.i += 1;
                            return Ok(Value::Obj(members));
                        }
                        _ => bail!("expected ',' or '}}' at byte {} of the JSON", self.i),
                    }
                }
            }
            b'[' => {
                self.i += 1;
                let mut items = Vec::new();
                if self.peek()? == b']' {
                    self.i += 1;
                    return Ok(Value::Arr(items));
                }
                loop {
                    items.push(self.value()?);
                    match self.peek()? {
                        b',' => self.i += 1,
                        b']' => {
                            self.i += 1;
                            return Ok(Value::Arr(items));
                        }
                        _ => bail!("expected ',' or ']' at byte {} of the JSON", self.i),
                    }
                }
            }
            b'"' => {
                self.i += 1;
                Ok(Value::Str(self.string()?))
            }
            b't' => self.literal("true", Value::Bool(true)),
            b'f' => self.literal("false", Value::Bool(false)),
            b'n' => self.literal("null", Value::Null),
            _ => {
                let start = self.i;
                while self.s.get(self.i).is_some_and(|c| c.is_ascii_digit() || b"+-.eE".contains(c)) {
                    self.i += 1;
                }
                if start == self.i {
                    bail!("unexpected byte at {} of the JSON", self.i);
                }
                Ok(Value::Num(String::from_utf8_lossy(&self.s[start..self.i]).into_owned()))
            }
        }
    }

    /// The rest of a string whose opening quote has been consumed.
    fn string(&mut self) -> Result<String> {
        let mut out = Vec::new();
        loop {
            let Some(&c) = self.s.get(self.i) else { bail!("unterminated string in the JSON") };
            self.i += 1;
            match c {
                b'"' => return Ok(String::from_utf8_lossy(&out).into_owned()),
                b'\\' => {
                    let Some(&e) = self.s.get(self.i) else { bail!("unterminated escape in the JSON") };
                    self.i += 1;
                    let ch = match e {
                        b'n' => '\n',
                        b't' => '\t',
                        b'r' => '\r',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'u' => {
                            let hex = self.s.get(self.i..self.i + 4).and_then(|h| std::str::from_utf8(h).ok());
                            let code = hex.and_then(|h| u32::from_str_radix(h, 16).ok());
                            self.i += 4;
                            // Surrogate halves are not needed here: replaced.
                            code.and_then(char::from_u32).unwrap_or('\u{fffd}')
                        }
                        other => char::from(other),
                    };
                    let mut buf = [0; 4];
                    out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                }
                _ => out.push(c),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_nested_documents() {
        let v =
            parse(r#" {"backups": [{"id": "B1", "size": 18446744073709551615, "ok": true}, null], "s": "a\"\u00e9"} "#)
                .unwrap();
        let b = &v.get("backups").unwrap().array().unwrap()[0];
        assert_eq!(b.get("id").and_then(Value::str), Some("B1"));
        assert_eq!(b.get("size").and_then(Value::u64), Some(u64::MAX));
        assert_eq!(b.get("ok"), Some(&Value::Bool(true)));
        assert_eq!(v.get("s").and_then(Value::str), Some("a\"é"));
        assert!(parse("[1,]").is_err());
        assert!(parse("{} x").is_err());
    }
}
