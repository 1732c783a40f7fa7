//! The Lua side's declarations of the C ABI against the Rust source, so
//! that the two cannot drift apart unnoticed.
//!
//! `lua/resty/counter/abi.lua` holds the one `ffi.cdef` and the codes by
//! name. This test reads it and every file under `src/`, and checks:
//!
//! - every `#[no_mangle]` function of the library is an `extern "C"` one
//!   declared in the cdef with the same parameter and return types, and
//!   the cdef declares no function the library lacks;
//! - every `#[repr(C)]` struct is declared with the same fields (names,
//!   types, order), every type the signatures name is declared, and the
//!   cdef declares no struct the library does not have;
//! - the codes in abi.lua are exactly the library's, with the same values:
//!   `Error`'s codes, the `pub const NAME: i32` of the ffi files (`CODE_`
//!   dropped; the ABI versions aside), `DeltaStatus`, `Op` and `Cmp`, and
//!   a counter record's kind and width;
//! - no other Lua file calls `ffi.cdef` or `ffi.load`.
//!
//! Rust types become C types as the C ABI passes them: `*const T` is
//! `const T *`, `AtomicU64` is `uint64_t`, a pointer to `[T; N]` is a
//! pointer to `T`. In C, `char`, `unsigned char` and `uint8_t` are one type
//! here (bytes; LuaJIT passes a Lua string to any of them).

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use resty_counter_core::engine::counter;
use resty_counter_core::histogram::MAX_EDGES;
use resty_counter_core::int64::{Cmp, Op, MAX_TEXT_LEN};
use resty_counter_core::pending::DeltaStatus;
use resty_counter_core::Error;

const ABI_LUA: &str = "lua/resty/counter/abi.lua";

/// The files whose `pub const NAME: i32` are codes Lua must name.
const FFI_FILES: [&str; 3] = ["src/ffi.rs", "src/ffi_int.rs", "src/ffi_engine.rs"];

/// Rust's name of each type that crosses the ABI by name, and C's.
const NAMED_TYPES: [(&str, &str); 13] = [
    // nginx's store function (lua-resty-core declares the same), passed
    // from Lua to a sync; nullable.
    ("Option<ShdictStore>", "rc_shdict_store_t"),
    ("PendingStore", "rc_store_t"),
    ("Report", "rc_report_t"),
    ("Engine", "rc_engine_t"),
    ("Slot", "rc_slot_t"),
    ("Delta", "rc_delta_t"),
    ("IntResult", "rc_int_result_t"),
    ("Changed", "rc_changed_t"),
    ("EngineStats", "rc_engine_stats_t"),
    ("StrictResult", "rc_strict_result_t"),
    ("RequestsShape", "rc_requests_shape_t"),
    ("LaxBatch", "rc_lax_batch_t"),
    ("LaxEntry", "rc_lax_entry_t"),
];

/// The constants that size arrays in `#[repr(C)]` structs.
const ARRAY_LENGTHS: [(&str, usize); 2] =
    [("MAX_TEXT_LEN", MAX_TEXT_LEN), ("MAX_EDGES", MAX_EDGES)];

/// A C type: its base type (const or not), then its pointer levels from
/// the innermost out, each const or not (`* const`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct CType {
    base: String,
    base_const: bool,
    pointers: Vec<bool>,
}

impl fmt::Display for CType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.base_const {
            f.write_str("const ")?;
        }
        f.write_str(&self.base)?;
        if !self.pointers.is_empty() {
            f.write_str(" ")?;
        }
        for &pointer_const in &self.pointers {
            f.write_str(if pointer_const { "* const " } else { "*" })?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Field {
    name: String,
    ty: CType,
    /// `Some(n)` for an array of `n`.
    len: Option<usize>,
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let space = if self.ty.pointers.is_empty() { " " } else { "" };
        write!(f, "{}{}{}", self.ty, space, self.name)?;
        match self.len {
            Some(len) => write!(f, "[{}]", len),
            None => Ok(()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Function {
    ret: CType,
    params: Vec<Field>,
}

impl fmt::Display for Function {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let params: Vec<String> = self.params.iter().map(Field::to_string).collect();
        write!(f, "{} ({})", self.ret, params.join(", "))
    }
}

/// One side's declarations: functions and structs by C name (`None`: an
/// opaque struct).
#[derive(Debug, Default)]
struct Declarations {
    functions: BTreeMap<String, Function>,
    structs: BTreeMap<String, Option<Vec<Field>>>,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {}", path.display(), e))
}

fn files_under(dir: &Path, extension: &str, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {}", dir.display(), e))
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("{}: {}", dir.display(), e));
    entries.sort();
    for path in entries {
        if path.is_dir() {
            files_under(&path, extension, out);
        } else if path.extension().map_or(false, |e| e == extension) {
            out.push(path);
        }
    }
}

fn screaming(camel: &str) -> String {
    let mut out = String::new();
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

// ---- Rust source ----

/// A Rust file without its `#[cfg(test)] mod` (test code, last in every
/// file of this crate: an error if ABI items follow it) and without `//`
/// comments.
fn rust_code(text: &str) -> Result<String, String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut code = String::new();
    for (i, line) in lines.iter().enumerate() {
        let next = lines.get(i + 1).map_or("", |l| l.trim_start());
        if line.trim() == "#[cfg(test)]" && next.starts_with("mod ") {
            let rest = lines[i..].join("\n");
            if rest.contains("#[no_mangle]") || rest.contains("#[repr(C)]") {
                return Err("ABI items in or after the test module".into());
            }
            break;
        }
        let line = match line.find("//") {
            Some(at) if !line[..at].contains('"') => &line[..at],
            _ => line,
        };
        code.push_str(line);
        code.push('\n');
    }
    Ok(code)
}

/// Splits at `sep` outside brackets.
fn split_top(text: &str, sep: char) -> Vec<String> {
    let mut parts = Vec::new();
    let mut depth = 0i32;
    let mut part = String::new();
    for c in text.chars() {
        match c {
            '(' | '[' | '<' | '{' => depth += 1,
            ')' | ']' | '>' | '}' => depth -= 1,
            _ => {}
        }
        if c == sep && depth == 0 {
            parts.push(std::mem::take(&mut part));
        } else {
            part.push(c);
        }
    }
    parts.push(part);
    parts
        .into_iter()
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect()
}

/// The text from `open` (an opening bracket at `start`) to its match.
fn bracketed(text: &str, start: usize) -> Result<&str, String> {
    let open = text[start..].chars().next().ok_or("no bracket")?;
    let close = match open {
        '(' => ')',
        '{' => '}',
        _ => return Err(format!("not a bracket: {:?}", open)),
    };
    let mut depth = 0;
    for (i, c) in text[start..].char_indices() {
        if c == open {
            depth += 1;
        } else if c == close {
            depth -= 1;
            if depth == 0 {
                return Ok(&text[start + 1..start + i]);
            }
        }
    }
    Err(format!("no {:?} after {:?}", close, &text[start..]))
}

fn rust_base(name: &str) -> Result<String, String> {
    let name = name.rsplit("::").next().unwrap_or(name);
    let c = match name {
        "i8" => "int8_t",
        "i16" => "int16_t",
        "i32" => "int32_t",
        "i64" => "int64_t",
        "u8" => "uint8_t",
        "u16" => "uint16_t",
        "u32" => "uint32_t",
        "u64" => "uint64_t",
        "usize" => "size_t",
        "isize" => "ptrdiff_t",
        "f32" => "float",
        "f64" => "double",
        "c_void" | "()" => "void",
        "c_char" => "char",
        "AtomicU64" => "uint64_t",
        "AtomicI64" => "int64_t",
        "AtomicU32" => "uint32_t",
        "AtomicI32" => "int32_t",
        _ => match NAMED_TYPES.iter().find(|(rust, _)| *rust == name) {
            Some((_, c)) => c,
            None => {
                return Err(format!(
                    "Rust type `{}` has no C name: add it to NAMED_TYPES",
                    name
                ))
            }
        },
    };
    Ok(canonical_base(c))
}

fn array_length(text: &str) -> Result<usize, String> {
    let text = text.trim();
    if let Ok(n) = text.parse() {
        return Ok(n);
    }
    let name = text.rsplit("::").next().unwrap_or(text);
    ARRAY_LENGTHS
        .iter()
        .find(|(known, _)| *known == name)
        .map(|&(_, n)| n)
        .ok_or_else(|| format!("array length `{}`: add it to ARRAY_LENGTHS", text))
}

/// `[T; N]` as (T, N).
fn rust_array(ty: &str) -> Result<Option<(&str, usize)>, String> {
    let ty = ty.trim();
    if !(ty.starts_with('[') && ty.ends_with(']')) {
        return Ok(None);
    }
    let inner = &ty[1..ty.len() - 1];
    let (elem, len) = inner
        .rsplit_once(';')
        .ok_or_else(|| format!("a slice crosses the ABI: {}", ty))?;
    Ok(Some((elem.trim(), array_length(len)?)))
}

/// A Rust parameter, return or pointee type as C sees it.
fn rust_type(ty: &str) -> Result<CType, String> {
    let ty = ty.trim();
    let pointer = if let Some(inner) = ty.strip_prefix("*const ") {
        Some((true, inner))
    } else {
        ty.strip_prefix("*mut ").map(|inner| (false, inner))
    };
    if let Some((pointee_const, inner)) = pointer {
        // A pointer to an array is a pointer to its first element.
        let inner = match rust_array(inner)? {
            Some((elem, _)) => elem,
            None => inner,
        };
        let mut t = rust_type(inner)?;
        if pointee_const {
            match t.pointers.last_mut() {
                Some(last) => *last = true,
                None => t.base_const = true,
            }
        }
        t.pointers.push(false);
        return Ok(t);
    }
    if ty.starts_with('[') || ty.starts_with('&') {
        return Err(format!("`{}` cannot cross the C ABI by value here", ty));
    }
    Ok(CType {
        base: rust_base(ty)?,
        base_const: false,
        pointers: Vec::new(),
    })
}

fn rust_field(name: &str, ty: &str) -> Result<Field, String> {
    let name = name.trim().trim_start_matches("mut ").trim().to_string();
    Ok(match rust_array(ty)? {
        Some((elem, len)) => Field {
            name,
            ty: rust_type(elem)?,
            len: Some(len),
        },
        None => Field {
            name,
            ty: rust_type(ty)?,
            len: None,
        },
    })
}

fn rust_function(code: &str, at: usize) -> Result<(String, Function), String> {
    let item = &code[at + "#[no_mangle]".len()..];
    let fn_at = item.find("fn ").ok_or("no fn")?;
    // The words before `fn`, other attributes left out.
    let head = item[..fn_at]
        .split_whitespace()
        .filter(|word| !word.starts_with("#["))
        .collect::<Vec<_>>()
        .join(" ");
    let name_end = item[fn_at..].find('(').ok_or("no (")? + fn_at;
    let name = item[fn_at + 3..name_end].trim().to_string();
    if !(head.starts_with("pub ") && head.ends_with("extern \"C\"")) {
        return Err(format!(
            "#[no_mangle] `{}` is not a `pub extern \"C\" fn` (it is `{}`)",
            name, head
        ));
    }
    let params_text = bracketed(item, name_end)?;
    let after = &item[name_end + params_text.len() + 2..];
    let body_at = after.find('{').ok_or("no body")?;
    let ret = match after[..body_at].trim().strip_prefix("->") {
        Some(ty) => rust_type(ty)?,
        None => rust_type("()")?,
    };
    let mut params = Vec::new();
    for param in split_top(params_text, ',') {
        let (pname, ty) = param
            .split_once(':')
            .ok_or_else(|| format!("{}: parameter `{}`", name, param))?;
        params.push(rust_field(pname, ty).map_err(|e| format!("{}: {}", name, e))?);
    }
    Ok((name, Function { ret, params }))
}

fn rust_struct(code: &str, at: usize) -> Result<(String, Vec<Field>), String> {
    let item = &code[at..];
    let struct_at = item.find("struct ").ok_or("no struct")?;
    let open = item[struct_at..].find('{').ok_or("no {")? + struct_at;
    let name = item[struct_at + 7..open].trim();
    let rust_name = name.split('<').next().unwrap_or(name).trim();
    let c_name = rust_base(rust_name)?;
    let mut fields = Vec::new();
    for field in split_top(bracketed(item, open)?, ',') {
        let field = field.trim().trim_start_matches("pub ").trim();
        let (fname, ty) = field
            .split_once(':')
            .ok_or_else(|| format!("{}: field `{}`", rust_name, field))?;
        fields.push(rust_field(fname, ty).map_err(|e| format!("{}: {}", rust_name, e))?);
    }
    Ok((c_name, fields))
}

/// The library's C ABI, as the Rust source under `src/` defines it.
fn rust_declarations() -> Result<Declarations, String> {
    let mut files = Vec::new();
    files_under(&root().join("src"), "rs", &mut files);
    let mut decls = Declarations::default();
    for file in files {
        let what = |e: String| format!("{}: {}", file.display(), e);
        let code = rust_code(&read(&file)).map_err(what)?;
        for (at, _) in code.match_indices("#[no_mangle]") {
            let (name, function) = rust_function(&code, at).map_err(what)?;
            decls.functions.insert(name, function);
        }
        for (at, _) in code.match_indices("#[repr(C)]") {
            let (name, fields) = rust_struct(&code, at).map_err(what)?;
            decls.structs.insert(name, Some(fields));
        }
    }
    Ok(decls)
}

// ---- C declarations in Lua ----

/// Every `ffi.cdef[[...]]` of a Lua file, comments removed.
fn cdef_text(lua: &str) -> String {
    let mut text = String::new();
    let mut rest = lua;
    while let Some(at) = rest.find("ffi.cdef[[") {
        let body = &rest[at + "ffi.cdef[[".len()..];
        let end = body.find("]]").unwrap_or(body.len());
        text.push_str(&body[..end]);
        text.push('\n');
        rest = &body[end..];
    }
    let mut out = String::new();
    let mut rest = text.as_str();
    while let Some(at) = rest.find("/*") {
        out.push_str(&rest[..at]);
        rest = rest[at..]
            .find("*/")
            .map_or("", |end| &rest[at + end + 2..]);
    }
    out.push_str(rest);
    out.lines()
        .map(|line| line.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

fn canonical_base(name: &str) -> String {
    match name {
        "char" | "unsigned char" => "uint8_t".to_string(),
        "signed char" => "int8_t".to_string(),
        _ => name.to_string(),
    }
}

fn tokens(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    for c in text.chars() {
        if c.is_ascii_alphanumeric() || c == '_' {
            word.push(c);
            continue;
        }
        if !word.is_empty() {
            out.push(std::mem::take(&mut word));
        }
        if !c.is_whitespace() {
            out.push(c.to_string());
        }
    }
    if !word.is_empty() {
        out.push(word);
    }
    out
}

fn is_identifier(token: &str) -> bool {
    token
        .chars()
        .next()
        .map_or(false, |c| c.is_ascii_alphabetic() || c == '_')
}

/// A C declaration (`const uint64_t **cells`, `char text[20]`, or a type
/// alone) as a field; an empty name for a type alone.
fn c_declaration(text: &str) -> Result<Field, String> {
    let mut tokens = tokens(text);
    let mut len = None;
    if tokens.last().map(String::as_str) == Some("]") {
        let open = tokens
            .iter()
            .rposition(|t| t == "[")
            .ok_or_else(|| format!("`{}`", text))?;
        let n = tokens[open + 1..tokens.len() - 1].concat();
        len = Some(
            n.parse()
                .map_err(|_| format!("array length `{}` in `{}`", n, text))?,
        );
        tokens.truncate(open);
    }
    let mut base_words = Vec::new();
    let mut ty = CType {
        base: String::new(),
        base_const: false,
        pointers: Vec::new(),
    };
    let mut name = String::new();
    for token in &tokens {
        match token.as_str() {
            "const" => match ty.pointers.last_mut() {
                Some(last) => *last = true,
                None => ty.base_const = true,
            },
            "*" => ty.pointers.push(false),
            "struct" => base_words.push(token.clone()),
            t if is_identifier(t) => {
                let multiword = matches!(
                    base_words.last().map(String::as_str),
                    Some("unsigned" | "signed" | "struct" | "long" | "short")
                );
                if base_words.is_empty() || (multiword && ty.pointers.is_empty()) {
                    base_words.push(token.clone());
                } else if name.is_empty() {
                    name = token.clone();
                } else {
                    return Err(format!("cannot read `{}`", text));
                }
            }
            _ => return Err(format!("cannot read `{}`", text)),
        }
    }
    ty.base = canonical_base(&base_words.join(" "));
    Ok(Field { name, ty, len })
}

fn c_struct(statement: &str) -> Result<(String, Option<Vec<Field>>), String> {
    let body = match statement.find('{') {
        Some(open) => {
            let body = bracketed(statement, open)?;
            let name = statement[open + body.len() + 2..].trim();
            let mut fields = Vec::new();
            for field in split_top(body, ';') {
                fields.push(c_declaration(&field)?);
            }
            return Ok((name.to_string(), Some(fields)));
        }
        None => statement,
    };
    let words: Vec<&str> = body.split_whitespace().collect();
    match words.as_slice() {
        ["typedef", "struct", _, name] => Ok((name.to_string(), None)),
        _ => Err(format!("cannot read `{}`", statement)),
    }
}

/// The name of `typedef ret (*name)(params)`, if the statement is one.
fn function_pointer_typedef(statement: &str) -> Option<String> {
    let rest = statement.strip_prefix("typedef ")?;
    let start = rest.find("(*")? + 2;
    let end = start + rest[start..].find(')')?;
    Some(rest[start..end].trim().to_string())
}

fn c_function(statement: &str) -> Result<(String, Function), String> {
    let open = statement
        .find('(')
        .ok_or_else(|| format!("cannot read `{}`", statement))?;
    let params_text = bracketed(statement, open)?;
    let head = c_declaration(&statement[..open])?;
    let mut params = Vec::new();
    if params_text.trim() != "void" {
        for param in split_top(params_text, ',') {
            params.push(c_declaration(&param)?);
        }
    }
    Ok((
        head.name,
        Function {
            ret: head.ty,
            params,
        },
    ))
}

/// What a Lua file declares through `ffi.cdef`.
fn lua_declarations(lua: &str) -> Result<Declarations, String> {
    let mut decls = Declarations::default();
    for statement in split_top(&cdef_text(lua), ';') {
        let statement = statement.split_whitespace().collect::<Vec<_>>().join(" ");
        if statement.starts_with("typedef struct") {
            let (name, fields) = c_struct(&statement)?;
            decls.structs.insert(name, fields);
        } else if let Some(name) = function_pointer_typedef(&statement) {
            // A function type the library takes a pointer of (nginx's,
            // not the library's own): declared by name, as an opaque type.
            decls.structs.insert(name, None);
        } else {
            let (name, function) = c_function(&statement)?;
            decls.functions.insert(name, function);
        }
    }
    Ok(decls)
}

// ---- codes ----

fn lua_codes(lua: &str) -> Result<BTreeMap<String, i64>, String> {
    let start = lua
        .find("\nlocal codes = {\n")
        .ok_or("no `local codes = {` in abi.lua")?;
    let body = &lua[start + "\nlocal codes = {\n".len()..];
    let end = body.find("\n}\n").ok_or("no `}` closing `codes`")?;
    let mut codes = BTreeMap::new();
    for line in body[..end].lines() {
        let line = line.split("--").next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let (name, value) = line
            .trim_end_matches(',')
            .split_once('=')
            .ok_or_else(|| format!("cannot read code `{}`", line))?;
        let value = value
            .trim()
            .parse()
            .map_err(|_| format!("code `{}`: not an integer", line))?;
        if codes.insert(name.trim().to_string(), value).is_some() {
            return Err(format!("code {} twice", name.trim()));
        }
    }
    Ok(codes)
}

/// Every code `from_code` knows, from 0 up to the first it does not, named
/// `prefix` and its variant's name.
fn codes_from<T: fmt::Debug>(
    codes: &mut Vec<(String, i64, String)>,
    prefix: &str,
    from_code: fn(i32) -> Option<T>,
    from: &str,
) {
    let mut code = 0;
    while let Some(variant) = from_code(code) {
        let name = format!("{}{}", prefix, screaming(&format!("{:?}", variant)));
        codes.push((name, i64::from(code), from.to_string()));
        code += 1;
    }
}

/// The codes of the library by the name Lua gives them, each with its
/// value and where it comes from.
fn rust_codes() -> Result<BTreeMap<String, (i64, String)>, String> {
    let mut codes: Vec<(String, i64, String)> = Vec::new();

    // A variant added to one of these enums must be added here too: these
    // matches stop compiling until it is.
    let _every_error = |e: Error| match e {
        Error::TooManyKeys
        | Error::OutOfExactRange
        | Error::BadSlot
        | Error::Internal
        | Error::CorruptRecord
        | Error::Overflow
        | Error::NotInteger
        | Error::BadArgument => (),
    };
    let _every_status = |s: DeltaStatus| match s {
        DeltaStatus::Ok | DeltaStatus::OutOfExactRange => (),
    };
    for e in Error::ALL {
        let name = screaming(&format!("{:?}", e));
        codes.push((name, i64::from(e.code()), "Error::code".into()));
    }
    for s in [DeltaStatus::Ok, DeltaStatus::OutOfExactRange] {
        let name = format!("DELTA_{}", screaming(&format!("{:?}", s)));
        codes.push((name, s as i64, "DeltaStatus".into()));
    }
    codes_from(&mut codes, "OP_", Op::from_code, "Op::from_code");
    codes_from(&mut codes, "CMP_", Cmp::from_code, "Cmp::from_code");
    codes.push((
        "COUNTER_KIND".into(),
        i64::from(counter::KIND),
        "engine::counter::KIND".into(),
    ));
    codes.push((
        "COUNTER_WIDTH".into(),
        i64::from(counter::WIDTH),
        "engine::counter::WIDTH".into(),
    ));
    for file in FFI_FILES {
        let code = rust_code(&read(&root().join(file))).map_err(|e| format!("{}: {}", file, e))?;
        for line in code.lines() {
            let rest = match line.trim().strip_prefix("pub const ") {
                Some(rest) => rest,
                None => continue,
            };
            let (name, value) = match rest.split_once(": i32 =") {
                Some(both) => both,
                None => continue,
            };
            if name.ends_with("ABI_VERSION") {
                continue;
            }
            let value = value.trim().trim_end_matches(';').trim();
            let value = value
                .parse()
                .map_err(|_| format!("{}: {} = `{}`: not an integer literal", file, name, value))?;
            let lua_name = name.strip_prefix("CODE_").unwrap_or(name);
            codes.push((lua_name.to_string(), value, format!("{} {}", file, name)));
        }
    }

    let mut by_name: BTreeMap<String, (i64, String)> = BTreeMap::new();
    for (name, value, from) in codes {
        if let Some((other, other_from)) = by_name.get(&name) {
            if *other != value {
                return Err(format!(
                    "{} is {} in {} but {} in {}",
                    name, other, other_from, value, from
                ));
            }
            continue;
        }
        by_name.insert(name, (value, from));
    }
    Ok(by_name)
}

// ---- the checks ----

fn compare(rust: &Declarations, lua: &Declarations) -> Vec<String> {
    let mut problems = Vec::new();
    for (name, function) in &rust.functions {
        match lua.functions.get(name) {
            None => problems.push(format!("{} is not declared in {}", name, ABI_LUA)),
            Some(declared) if declared.ret != function.ret => problems.push(format!(
                "{} returns {} in Rust, {} in {}",
                name, function.ret, declared.ret, ABI_LUA
            )),
            Some(declared) => {
                let types =
                    |f: &Function| f.params.iter().map(|p| p.ty.clone()).collect::<Vec<_>>();
                if types(declared) != types(function) {
                    problems.push(format!(
                        "{}: parameters differ:\n  Rust: {}\n  Lua:  {}",
                        name, function, declared
                    ));
                }
            }
        }
    }
    for name in lua.functions.keys() {
        if !rust.functions.contains_key(name) {
            problems.push(format!(
                "{} declares {}, which the library does not export",
                ABI_LUA, name
            ));
        }
    }

    let mut named: Vec<String> = rust.structs.keys().cloned().collect();
    for function in rust.functions.values() {
        for ty in function.params.iter().map(|p| &p.ty).chain([&function.ret]) {
            if NAMED_TYPES.iter().any(|(_, c)| *c == ty.base) {
                named.push(ty.base.clone());
            }
        }
    }
    named.sort();
    named.dedup();
    for name in &named {
        match (rust.structs.get(name), lua.structs.get(name)) {
            (_, None) => problems.push(format!("{} does not declare {}", ABI_LUA, name)),
            (Some(Some(fields)), Some(Some(declared))) if fields != declared => {
                let show = |f: &[Field]| {
                    f.iter()
                        .map(Field::to_string)
                        .collect::<Vec<_>>()
                        .join("; ")
                };
                problems.push(format!(
                    "struct {} differs:\n  Rust: {}\n  Lua:  {}",
                    name,
                    show(fields),
                    show(declared)
                ));
            }
            (Some(Some(_)), Some(None)) => problems.push(format!(
                "{} declares {} opaque: Rust has its fields (#[repr(C)])",
                ABI_LUA, name
            )),
            (None, Some(Some(_))) => problems.push(format!(
                "{} declares fields of {}, which is not #[repr(C)] in Rust",
                ABI_LUA, name
            )),
            _ => {}
        }
    }
    for name in lua.structs.keys() {
        if !named.contains(name) {
            problems.push(format!(
                "{} declares {}, which no Rust type is (NAMED_TYPES, #[repr(C)])",
                ABI_LUA, name
            ));
        }
    }
    problems
}

fn compare_codes(
    rust: &BTreeMap<String, (i64, String)>,
    lua: &BTreeMap<String, i64>,
) -> Vec<String> {
    let mut problems = Vec::new();
    for (name, (value, from)) in rust {
        match lua.get(name) {
            None => problems.push(format!(
                "{} ({} = {}) is not in {}",
                name, from, value, ABI_LUA
            )),
            Some(declared) if declared != value => problems.push(format!(
                "{} is {} in {} ({}), {} in {}",
                name, value, from, "Rust", declared, ABI_LUA
            )),
            _ => {}
        }
    }
    for name in lua.keys() {
        if !rust.contains_key(name) {
            problems.push(format!(
                "{} names {}, which the library has not",
                ABI_LUA, name
            ));
        }
    }
    problems
}

fn fail_on(problems: Vec<String>) {
    assert!(
        problems.is_empty(),
        "the Lua declarations and the Rust source differ:\n- {}",
        problems.join("\n- ")
    );
}

#[test]
fn every_function_and_struct_is_declared_as_rust_defines_it() -> Result<(), String> {
    let rust = rust_declarations()?;
    let lua = lua_declarations(&read(&root().join(ABI_LUA)))?;
    // The parsers read something: a broken one would find nothing on
    // either side and agree.
    assert!(rust.functions.len() >= 30, "{:?}", rust.functions.keys());
    assert!(rust.structs.len() >= 5, "{:?}", rust.structs.keys());
    fail_on(compare(&rust, &lua));
    Ok(())
}

#[test]
fn every_code_has_its_rust_name_and_value() -> Result<(), String> {
    let rust = rust_codes()?;
    let lua = lua_codes(&read(&root().join(ABI_LUA)))?;
    assert!(rust.len() >= 30, "{:?}", rust);
    fail_on(compare_codes(&rust, &lua));
    Ok(())
}

#[test]
fn no_other_lua_file_declares_or_loads() {
    let mut files = Vec::new();
    files_under(&root().join("lua"), "lua", &mut files);
    let mut problems = Vec::new();
    for file in files {
        if file.ends_with(ABI_LUA) {
            continue;
        }
        for (i, line) in read(&file).lines().enumerate() {
            let code = line.split("--").next().unwrap_or("");
            if code.contains("cdef") || code.contains("ffi.load") || code.contains("ffi_load") {
                problems.push(format!(
                    "{}:{}: `{}`: declarations and the library's load belong in {}",
                    file.display(),
                    i + 1,
                    line.trim(),
                    ABI_LUA
                ));
            }
        }
    }
    fail_on(problems);
}

#[test]
fn the_parsers_read_c_and_rust_types_alike() -> Result<(), String> {
    // (Rust, C, whether they are the same type)
    let cases = [
        ("*const u8", "const unsigned char *p", true),
        ("*const u8", "const char *p", true),
        ("*mut *const AtomicU64", "const uint64_t **p", true),
        ("*mut *mut Engine", "rc_engine_t **p", true),
        ("*mut [u8; MAX_TEXT_LEN]", "char *p", true),
        ("*const std::os::raw::c_void", "const void *p", true),
        ("usize", "size_t p", true),
        ("*const u8", "unsigned char *p", false),
        ("*mut *const AtomicU64", "uint64_t **p", false),
        ("*const *mut u64", "const uint64_t **p", false),
        ("u32", "int32_t p", false),
        ("*mut u32", "uint32_t p", false),
    ];
    for (rust, c, same) in cases {
        let (rust_ty, c_ty) = (rust_type(rust)?, c_declaration(c)?.ty);
        assert_eq!(rust_ty == c_ty, same, "{} / {}", rust, c);
    }
    assert!(rust_type("*const Unknown").is_err());
    Ok(())
}
