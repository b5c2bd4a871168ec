//! A bounded pickle machine: reads the pickles `torch.save` writes into a tree of inert values,
//! and nothing more.
//!
//! Nothing in a pickle is ever run: a `GLOBAL` is recorded as the two names it spells, a
//! `REDUCE` or `NEWOBJ` as the callable and its arguments, a `BUILD`'s state is dropped. Only
//! `collections.OrderedDict` and `defaultdict` (the containers state dicts are made of) become
//! what they stand for, an empty dictionary; what the names mean otherwise is for the reader of
//! the tree to decide (see [`torch_file`](super::torch_file)).
//!
//! Values live in one arena and refer to each other by index, so a memo fetch (`BINGET`) shares
//! a value instead of copying it (a "memo bomb" that doubles a list each level costs one value
//! per level), and dropping the tree is a flat loop over the arena, whatever its nesting. The
//! machine never recurses, and neither does anything that reads its tree. Its bounds, all
//! checked before the value they guard is made:
//! - every length (strings, bytes, frames) against the input that remains;
//! - nesting: [`MAX_DEPTH`] levels of values and of `MARK`s;
//! - [`MAX_NODES`] values, [`MAX_MEMO`] memo entries and [`MAX_STACK`] stack entries; every
//!   opcode reads at least one byte and moves a stack entry at most once, so the work is linear
//!   in the input (`ops` counts the opcodes run).
//!
//! A container is *sealed* once it is placed inside another one; adding to a sealed container
//! is refused. That keeps every value's recorded depth exact (a value nested earlier cannot
//! grow deeper afterwards) and makes cycles impossible; pickles of state dicts never add to a
//! container after nesting it (only self-referencing objects do).
//!
//! The machine reads one pickle from a byte slice and reports where it stopped, so that a
//! container holding several (torch's legacy format) can read them in turn.

use std::collections::HashMap;

/// Nesting levels of values, and of `MARK`s, the machine accepts. A state dict is about six
/// deep (dictionary, rebuild call, its arguments, the storage's persistent id and its tuple); a
/// training checkpoint's optimizer state a few more.
pub const MAX_DEPTH: usize = 100;
/// Values in one pickle (a state dict makes about fifteen per tensor; a value takes 48 bytes).
pub const MAX_NODES: usize = 1 << 20;
/// Memo entries in one pickle.
pub const MAX_MEMO: usize = 1 << 20;
/// Entries on the machine's stack at once.
pub const MAX_STACK: usize = 1 << 20;
/// Length of each of a `GLOBAL`'s two names.
const MAX_GLOBAL_NAME: usize = 256;
/// The newest pickle protocol.
const MAX_PROTOCOL: u8 = 5;

/// A value's index in [`Pickle`]'s arena.
pub type Id = u32;

/// One value of a pickle. Containers hold their children's [`Id`]s.
#[derive(Debug)]
pub enum Value {
    /// `None`.
    None,
    /// A bool.
    Bool(bool),
    /// An integer that fits in 64 bits.
    Int(i64),
    /// An integer wider than 64 bits (`LONG1`, `LONG4`): only its size is kept.
    BigInt {
        /// Its length in bytes.
        bytes: usize,
    },
    /// A float.
    Float(f64),
    /// A string (`str`, or a Python 2 `unicode`).
    Str(Box<str>),
    /// `bytes`, `bytearray` or a Python 2 `str`: only the length is kept.
    Bytes {
        /// Its length in bytes.
        len: usize,
    },
    /// A tuple.
    Tuple(Vec<Id>),
    /// A list.
    List(Vec<Id>),
    /// Items in the order they were set; a key set twice appears twice.
    Dict(Vec<(Id, Id)>),
    /// A set or frozenset.
    Set(Vec<Id>),
    /// A `GLOBAL` or `STACK_GLOBAL`: the names only, never imported.
    Global {
        /// The module, as the pickle spells it.
        module: Box<str>,
        /// The name within the module.
        name: Box<str>,
    },
    /// `REDUCE`, `NEWOBJ` or `NEWOBJ_EX` of `callable` with `args`: recorded, never called.
    Object {
        /// The value called (a global, as a rule).
        callable: Id,
        /// Its arguments (a tuple, as a rule).
        args: Id,
    },
    /// `BINPERSID`: a reference the container resolves (torch: a tensor's storage).
    PersistentId(Id),
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) | Value::BigInt { .. } => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes { .. } => "bytes",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Set(_) => "set",
            Value::Global { .. } => "global",
            Value::Object { .. } => "object",
            Value::PersistentId(_) => "persistent id",
        }
    }
}

#[derive(Debug)]
struct Node {
    value: Value,
    /// 1 for a leaf, else one more than its deepest child.
    depth: u32,
    /// Placed inside another value: no longer added to.
    sealed: bool,
}

/// A pickle read into an arena of inert values.
#[derive(Debug)]
pub struct Pickle {
    nodes: Vec<Node>,
    root: Id,
    /// Bytes of the input up to and including `STOP`.
    consumed: usize,
    /// Opcodes run.
    #[cfg_attr(not(test), allow(dead_code))] // the tests' bound on the work done
    ops: u64,
}

impl Pickle {
    /// The value `STOP` returned.
    pub fn root(&self) -> Id {
        self.root
    }

    /// The value `id` names.
    pub fn value(&self, id: Id) -> &Value {
        &self.nodes[id as usize].value
    }

    /// Bytes of the input the pickle took, `STOP` included.
    pub fn consumed(&self) -> usize {
        self.consumed
    }

    /// What every `BINPERSID` referred to, in the order they were read.
    pub fn persistent_ids(&self) -> impl Iterator<Item = Id> + '_ {
        self.nodes.iter().filter_map(|node| match node.value {
            Value::PersistentId(referent) => Some(referent),
            _ => None,
        })
    }

    /// Opcodes run.
    #[cfg(test)]
    pub fn ops(&self) -> u64 {
        self.ops
    }

    /// Values made.
    #[cfg(test)]
    pub fn nodes(&self) -> usize {
        self.nodes.len()
    }

    /// Nesting of the value `id` (1 for a leaf).
    #[cfg(test)]
    pub fn depth(&self, id: Id) -> u32 {
        self.nodes[id as usize].depth
    }

    /// The string `id` holds, if it is one.
    pub fn str(&self, id: Id) -> Option<&str> {
        match self.value(id) {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The 64-bit integer `id` holds, if it is one.
    pub fn int(&self, id: Id) -> Option<i64> {
        match self.value(id) {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }

    /// The items of the tuple `id`, if it is one.
    pub fn tuple(&self, id: Id) -> Option<&[Id]> {
        match self.value(id) {
            Value::Tuple(items) => Some(items),
            _ => None,
        }
    }

    /// The items of the dictionary `id` in the order they were set, if it is one.
    pub fn dict(&self, id: Id) -> Option<&[(Id, Id)]> {
        match self.value(id) {
            Value::Dict(items) => Some(items),
            _ => None,
        }
    }

    /// The value under the string key `key` of the dictionary `id` (the last one set, as
    /// Python keeps it).
    pub fn dict_get(&self, id: Id, key: &str) -> Option<Id> {
        self.dict(id)?
            .iter()
            .rev()
            .find(|&&(k, _)| self.str(k) == Some(key))
            .map(|&(_, v)| v)
    }

    /// The module and name of the global `id`, if it is one.
    pub fn global(&self, id: Id) -> Option<(&str, &str)> {
        match self.value(id) {
            Value::Global { module, name } => Some((module, name)),
            _ => None,
        }
    }

    /// The callable and arguments of a `REDUCE`/`NEWOBJ` value.
    pub fn object(&self, id: Id) -> Option<(Id, Id)> {
        match self.value(id) {
            Value::Object { callable, args } => Some((*callable, *args)),
            _ => None,
        }
    }

    /// What the `BINPERSID` value `id` refers to, if it is one.
    pub fn persistent_id(&self, id: Id) -> Option<Id> {
        match self.value(id) {
            Value::PersistentId(pid) => Some(*pid),
            _ => None,
        }
    }

    /// A short description of the value `id` for error messages.
    pub fn describe(&self, id: Id) -> String {
        match self.value(id) {
            Value::Bool(b) => format!("the bool {b}"),
            Value::Int(i) => format!("the int {i}"),
            Value::BigInt { bytes } => format!("an int of {bytes} bytes"),
            Value::Float(v) => format!("the float {v}"),
            Value::Bytes { len } => format!("{len} bytes"),
            Value::Str(s) if s.len() <= 64 => format!("the str {s:?}"),
            Value::Global { module, name } => format!("the global {module}.{name}"),
            other => format!("a {}", other.kind()),
        }
    }
}

/// Why a pickle was refused: what, and the input offset of the opcode at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PickleError {
    /// Where the opcode at fault starts, in bytes from the pickle's start.
    pub offset: usize,
    /// What was wrong.
    pub what: String,
    /// Whether the input ended before the pickle did (a truncated file, or a head read of a
    /// file cut short), as opposed to bytes no pickle holds.
    pub ran_out: bool,
}

impl std::fmt::Display for PickleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "at byte {}: {}", self.offset, self.what)
    }
}

/// Reads one pickle from the start of `input` (up to its `STOP`).
pub fn parse(input: &[u8]) -> Result<Pickle, PickleError> {
    let mut machine = Machine {
        input,
        pos: 0,
        op_start: 0,
        nodes: Vec::new(),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        ops: 0,
        ran_out: false,
    };
    let root = machine.run()?;
    Ok(Pickle {
        nodes: machine.nodes,
        root,
        consumed: machine.pos,
        ops: machine.ops,
    })
}

type Step<T> = Result<T, String>;

struct Machine<'a> {
    input: &'a [u8],
    pos: usize,
    op_start: usize,
    nodes: Vec<Node>,
    stack: Vec<Id>,
    /// Stack lengths at each open `MARK` (Python's metastack).
    marks: Vec<usize>,
    memo: HashMap<u32, Id>,
    ops: u64,
    /// Set when an opcode needed bytes past the input's end.
    ran_out: bool,
}

impl Machine<'_> {
    fn run(&mut self) -> Result<Id, PickleError> {
        loop {
            self.op_start = self.pos;
            match self.step() {
                Ok(Some(root)) => return Ok(root),
                Ok(None) => {}
                Err(what) => {
                    return Err(PickleError {
                        offset: self.op_start,
                        what,
                        ran_out: self.ran_out,
                    });
                }
            }
        }
    }

    fn take(&mut self, n: u64) -> Step<&[u8]> {
        let left = self.input.len() - self.pos;
        if n > left as u64 {
            self.ran_out = true;
            return Err(format!(
                "needs {n} bytes, but only {left} remain: truncated or corrupt"
            ));
        }
        let start = self.pos;
        self.pos += n as usize;
        Ok(&self.input[start..self.pos])
    }

    fn array<const N: usize>(&mut self) -> Step<[u8; N]> {
        let bytes = self.take(N as u64)?;
        Ok(bytes.try_into().unwrap_or([0; N]))
    }

    fn u8(&mut self) -> Step<u8> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Step<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Step<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A `GLOBAL` name: one line, without its newline.
    fn line(&mut self) -> Step<Box<str>> {
        let rest = &self.input[self.pos..];
        let window = &rest[..rest.len().min(MAX_GLOBAL_NAME + 1)];
        let Some(end) = window.iter().position(|&b| b == b'\n') else {
            return Err(format!(
                "GLOBAL name longer than {MAX_GLOBAL_NAME} bytes or not ended by a newline"
            ));
        };
        let name = std::str::from_utf8(&window[..end])
            .map_err(|_| "GLOBAL name is not UTF-8".to_string())?
            .into();
        self.pos += end + 1;
        Ok(name)
    }

    fn new_node(&mut self, value: Value, depth: u32) -> Step<Id> {
        if self.nodes.len() >= MAX_NODES {
            return Err(format!("more than {MAX_NODES} values"));
        }
        if depth as usize > MAX_DEPTH {
            return Err(format!("values nested deeper than {MAX_DEPTH} levels"));
        }
        self.nodes.push(Node {
            value,
            depth,
            sealed: false,
        });
        Ok((self.nodes.len() - 1) as Id)
    }

    fn leaf(&mut self, value: Value) -> Step<()> {
        let id = self.new_node(value, 1)?;
        self.push(id)
    }

    fn push(&mut self, id: Id) -> Step<()> {
        if self.stack.len() >= MAX_STACK {
            return Err(format!("more than {MAX_STACK} values on the stack"));
        }
        self.stack.push(id);
        Ok(())
    }

    /// The stack's length below which the innermost open `MARK` hides the entries.
    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn pop(&mut self) -> Step<Id> {
        if self.stack.len() <= self.floor() {
            return Err("pops an empty stack".into());
        }
        Ok(self.stack.pop().unwrap_or(0))
    }

    fn top(&self) -> Step<Id> {
        if self.stack.len() <= self.floor() {
            return Err("reads the top of an empty stack".into());
        }
        Ok(self.stack[self.stack.len() - 1])
    }

    fn pop_mark(&mut self) -> Step<Vec<Id>> {
        let Some(mark) = self.marks.pop() else {
            return Err("no MARK to pop to".into());
        };
        Ok(self.stack.split_off(mark))
    }

    /// Seals `children` (placed inside a new or growing value) and returns the depth a value
    /// holding them has.
    fn seal(&mut self, children: &[Id]) -> u32 {
        let mut deepest = 0;
        for &child in children {
            let node = &mut self.nodes[child as usize];
            node.sealed = true;
            deepest = deepest.max(node.depth);
        }
        deepest + 1
    }

    /// A new value holding `children`.
    fn container(&mut self, value: Value, children: &[Id]) -> Step<Id> {
        let depth = self.seal(children);
        self.new_node(value, depth)
    }

    fn tuple(&mut self, items: Vec<Id>) -> Step<()> {
        let children = items.clone();
        let id = self.container(Value::Tuple(items), &children)?;
        self.push(id)
    }

    /// Adds `children` to the container on top of the stack, which `add` receives.
    fn add_to_top(
        &mut self,
        op: &str,
        children: &[Id],
        add: impl FnOnce(&mut Value) -> Result<(), &'static str>,
    ) -> Step<()> {
        let target = self.top()?;
        // Sealed first: a container added to itself is then refused as sealed.
        let depth = self.seal(children);
        let node = &mut self.nodes[target as usize];
        if node.sealed {
            return Err(format!(
                "{op} adds to a {} already placed inside another value (a cycle or \
                 back-reference, which a state dict never has)",
                node.value.kind()
            ));
        }
        let kind = node.value.kind();
        add(&mut node.value).map_err(|wanted| format!("{op} on a {kind}, not a {wanted}"))?;
        if depth as usize > MAX_DEPTH {
            return Err(format!("values nested deeper than {MAX_DEPTH} levels"));
        }
        node.depth = node.depth.max(depth);
        Ok(())
    }

    fn memo_put(&mut self, key: u32) -> Step<()> {
        let top = self.top()?;
        if self.memo.len() >= MAX_MEMO && !self.memo.contains_key(&key) {
            return Err(format!("more than {MAX_MEMO} memo entries"));
        }
        self.memo.insert(key, top);
        Ok(())
    }

    fn memo_get(&mut self, key: u32) -> Step<()> {
        let id = *self
            .memo
            .get(&key)
            .ok_or_else(|| format!("fetches memo entry {key}, which was never stored"))?;
        self.push(id)
    }

    /// `REDUCE`/`NEWOBJ`: the containers state dicts are made of become empty dictionaries;
    /// everything else an inert record of the call.
    fn call(&mut self, callable: Id, args: Id) -> Step<()> {
        let is_dict = matches!(
            self.nodes[callable as usize].value,
            Value::Global { ref module, ref name }
                if &**module == "collections"
                    && matches!(&**name, "OrderedDict" | "defaultdict")
        );
        let id = if is_dict {
            self.seal(&[callable, args]);
            self.new_node(Value::Dict(Vec::new()), 1)?
        } else {
            self.container(Value::Object { callable, args }, &[callable, args])?
        };
        self.push(id)
    }

    fn string(&mut self, len: u64) -> Step<()> {
        let bytes = self.take(len)?;
        let text = std::str::from_utf8(bytes)
            .map_err(|_| "a string that is not UTF-8".to_string())?
            .into();
        self.leaf(Value::Str(text))
    }

    fn bytes(&mut self, len: u64) -> Step<()> {
        self.take(len)?;
        self.leaf(Value::Bytes { len: len as usize })
    }

    /// A little-endian two's-complement integer of `n` bytes (`LONG1`, `LONG4`).
    fn long(&mut self, n: u64) -> Step<()> {
        let bytes = self.take(n)?;
        if bytes.len() > 8 {
            let n = bytes.len();
            return self.leaf(Value::BigInt { bytes: n });
        }
        let mut word = match bytes.last() {
            Some(&b) if b & 0x80 != 0 => [0xFF; 8],
            _ => [0; 8],
        };
        word[..bytes.len()].copy_from_slice(bytes);
        self.leaf(Value::Int(i64::from_le_bytes(word)))
    }

    /// Runs one opcode; `Some(root)` at `STOP`.
    fn step(&mut self) -> Step<Option<Id>> {
        let Some(&op) = self.input.get(self.pos) else {
            self.ran_out = true;
            return Err("the pickle ends without STOP: truncated".into());
        };
        self.pos += 1;
        self.ops += 1;
        match op {
            // PROTO
            0x80 => {
                let version = self.u8()?;
                if version > MAX_PROTOCOL {
                    return Err(format!(
                        "pickle protocol {version} (at most {MAX_PROTOCOL})"
                    ));
                }
            }
            // FRAME: a hint for buffered readers; the whole input is in memory.
            0x95 => {
                let len = self.u64()?;
                let left = self.input.len() - self.pos;
                if len > left as u64 {
                    return Err(format!("a frame of {len} bytes, but only {left} remain"));
                }
            }
            b'.' => return self.pop().map(Some),
            b'(' => {
                if self.marks.len() >= MAX_DEPTH {
                    return Err(format!("MARKs nested deeper than {MAX_DEPTH} levels"));
                }
                self.marks.push(self.stack.len());
            }
            // POP: the top value, or else the innermost mark (as CPython does).
            b'0' => {
                if self.stack.len() > self.floor() {
                    self.pop()?;
                } else {
                    self.pop_mark()?;
                }
            }
            // POP_MARK
            b'1' => {
                self.pop_mark()?;
            }
            // DUP
            b'2' => {
                let top = self.top()?;
                self.push(top)?;
            }
            b'N' => self.leaf(Value::None)?,
            0x88 => self.leaf(Value::Bool(true))?,
            0x89 => self.leaf(Value::Bool(false))?,
            // BININT, BININT1, BININT2
            b'J' => {
                let v = i32::from_le_bytes(self.array()?);
                self.leaf(Value::Int(v.into()))?;
            }
            b'K' => {
                let v = self.u8()?;
                self.leaf(Value::Int(v.into()))?;
            }
            b'M' => {
                let v = u16::from_le_bytes(self.array()?);
                self.leaf(Value::Int(v.into()))?;
            }
            // LONG1, LONG4
            0x8a => {
                let n = self.u8()?;
                self.long(n.into())?;
            }
            0x8b => {
                let n = i32::from_le_bytes(self.array()?);
                let n = u64::try_from(n).map_err(|_| "LONG4 of negative length".to_string())?;
                self.long(n)?;
            }
            // BINFLOAT: big-endian, unlike the integers.
            b'G' => {
                let v = f64::from_be_bytes(self.array()?);
                self.leaf(Value::Float(v))?;
            }
            // SHORT_BINUNICODE, BINUNICODE, BINUNICODE8
            0x8c => {
                let n = self.u8()?;
                self.string(n.into())?;
            }
            b'X' => {
                let n = self.u32()?;
                self.string(n.into())?;
            }
            0x8d => {
                let n = self.u64()?;
                self.string(n)?;
            }
            // SHORT_BINBYTES, BINBYTES, BINBYTES8, BYTEARRAY8, SHORT_BINSTRING, BINSTRING
            b'C' | b'U' => {
                let n = self.u8()?;
                self.bytes(n.into())?;
            }
            b'B' | b'T' => {
                let n = self.u32()?;
                self.bytes(n.into())?;
            }
            0x8e | 0x96 => {
                let n = self.u64()?;
                self.bytes(n)?;
            }
            b')' => self.tuple(Vec::new())?,
            b't' => {
                let items = self.pop_mark()?;
                self.tuple(items)?;
            }
            0x85..=0x87 => {
                let n = usize::from(op - 0x84);
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.pop()?);
                }
                items.reverse();
                self.tuple(items)?;
            }
            b']' => self.leaf(Value::List(Vec::new()))?,
            b'}' => self.leaf(Value::Dict(Vec::new()))?,
            0x8f => self.leaf(Value::Set(Vec::new()))?,
            // LIST, DICT, FROZENSET: a new container of the items above the mark.
            b'l' | b'd' | 0x91 => {
                let items = self.pop_mark()?;
                let value = match op {
                    b'l' => Value::List(items.clone()),
                    0x91 => Value::Set(items.clone()),
                    _ => Value::Dict(pairs(&items)?),
                };
                let id = self.container(value, &items)?;
                self.push(id)?;
            }
            // APPEND, APPENDS
            b'a' => {
                let item = self.pop()?;
                self.add_to_top("APPEND", &[item], |target| match target {
                    Value::List(items) => {
                        items.push(item);
                        Ok(())
                    }
                    _ => Err("list"),
                })?;
            }
            b'e' => {
                let items = self.pop_mark()?;
                let children = items.clone();
                self.add_to_top("APPENDS", &children, |target| match target {
                    Value::List(list) => {
                        list.extend(items);
                        Ok(())
                    }
                    _ => Err("list"),
                })?;
            }
            // ADDITEMS
            0x90 => {
                let items = self.pop_mark()?;
                let children = items.clone();
                self.add_to_top("ADDITEMS", &children, |target| match target {
                    Value::Set(set) => {
                        set.extend(items);
                        Ok(())
                    }
                    _ => Err("set"),
                })?;
            }
            // SETITEM, SETITEMS
            b's' => {
                let value = self.pop()?;
                let key = self.pop()?;
                self.add_to_top("SETITEM", &[key, value], |target| match target {
                    Value::Dict(dict) => {
                        dict.push((key, value));
                        Ok(())
                    }
                    _ => Err("dict"),
                })?;
            }
            b'u' => {
                let items = self.pop_mark()?;
                let new = pairs(&items)?;
                self.add_to_top("SETITEMS", &items, |target| match target {
                    Value::Dict(dict) => {
                        dict.extend(new);
                        Ok(())
                    }
                    _ => Err("dict"),
                })?;
            }
            // GLOBAL, STACK_GLOBAL: recorded, never imported.
            b'c' => {
                let module = self.line()?;
                let name = self.line()?;
                self.leaf(Value::Global { module, name })?;
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                let text = |id: Id| match &self.nodes[id as usize].value {
                    Value::Str(s) if s.len() <= MAX_GLOBAL_NAME => Ok(s.clone()),
                    _ => Err(format!(
                        "STACK_GLOBAL of a name that is not a str of at most \
                         {MAX_GLOBAL_NAME} bytes"
                    )),
                };
                let (module, name) = (text(module)?, text(name)?);
                self.leaf(Value::Global { module, name })?;
            }
            // REDUCE, NEWOBJ, NEWOBJ_EX: recorded, never called.
            b'R' | 0x81 => {
                let args = self.pop()?;
                let callable = self.pop()?;
                self.call(callable, args)?;
            }
            0x92 => {
                let kwargs = self.pop()?;
                let args = self.pop()?;
                let callable = self.pop()?;
                self.seal(&[kwargs]);
                self.call(callable, args)?;
            }
            // BUILD: the state would be set on the object by Python code; it is dropped.
            b'b' => {
                let state = self.pop()?;
                self.top()?;
                self.seal(&[state]);
            }
            // BINPERSID
            b'Q' => {
                let pid = self.pop()?;
                let id = self.container(Value::PersistentId(pid), &[pid])?;
                self.push(id)?;
            }
            // BINPUT, LONG_BINPUT, MEMOIZE
            b'q' => {
                let key = self.u8()?;
                self.memo_put(key.into())?;
            }
            b'r' => {
                let key = self.u32()?;
                self.memo_put(key)?;
            }
            0x94 => {
                let key = u32::try_from(self.memo.len())
                    .map_err(|_| "too many memo entries".to_string())?;
                self.memo_put(key)?;
            }
            // BINGET, LONG_BINGET: the same value again, shared.
            b'h' => {
                let key = self.u8()?;
                self.memo_get(key.into())?;
            }
            b'j' => {
                let key = self.u32()?;
                self.memo_get(key)?;
            }
            b'I' | b'L' | b'F' | b'S' | b'V' | b'P' | b'p' | b'g' | b'i' | b'o' => {
                return Err(format!(
                    "opcode {:?} of the text protocol 0, which torch.save does not write",
                    op as char
                ));
            }
            _ => return Err(format!("unsupported opcode 0x{op:02x}")),
        }
        Ok(None)
    }
}

/// Key-value pairs from a flat list of items.
fn pairs(items: &[Id]) -> Step<Vec<(Id, Id)>> {
    if !items.len().is_multiple_of(2) {
        return Err(format!(
            "{} items for key-value pairs (an odd count)",
            items.len()
        ));
    }
    Ok(items.chunks_exact(2).map(|kv| (kv[0], kv[1])).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_values_a_state_dict_is_made_of() {
        // {'a': (1, -2, 3.5, None, True, 'x', b'yz', 300, 2**40, -1)} with memo reuse.
        let mut p = vec![0x80, 2, b'}', b'q', 0, b'X', 1, 0, 0, 0, b'a', b'('];
        p.extend([b'K', 1, 0x8a, 1, 0xFE, b'G']);
        p.extend(3.5f64.to_be_bytes());
        p.extend([
            b'N', 0x88, 0x8c, 1, b'x', b'C', 2, b'y', b'z', b'M', 0x2C, 0x01,
        ]);
        p.extend([
            0x8a, 6, 0, 0, 0, 0, 0, 1, b'J', 0xFF, 0xFF, 0xFF, 0xFF, b't', b's', b'.',
        ]);
        let pickle = parse(&p).unwrap();
        assert_eq!(pickle.consumed(), p.len());
        let root = pickle.root();
        let items = pickle.tuple(pickle.dict_get(root, "a").unwrap()).unwrap();
        let ints: Vec<_> = items.iter().map(|&i| pickle.int(i)).collect();
        assert_eq!(ints[0], Some(1));
        assert_eq!(ints[1], Some(-2));
        assert!(matches!(pickle.value(items[2]), Value::Float(v) if *v == 3.5));
        assert!(matches!(pickle.value(items[3]), Value::None));
        assert!(matches!(pickle.value(items[4]), Value::Bool(true)));
        assert_eq!(pickle.str(items[5]), Some("x"));
        assert!(matches!(pickle.value(items[6]), Value::Bytes { len: 2 }));
        assert_eq!(ints[7], Some(300));
        assert_eq!(ints[8], Some(1 << 40));
        assert_eq!(ints[9], Some(-1));
        assert_eq!(pickle.depth(root), 3);
    }

    #[test]
    fn refuses_malformed_pickles_naming_the_byte() {
        // (input, offset, what, whether the input ran out)
        let cases: [(&[u8], usize, &str, bool); 9] = [
            (b"", 0, "ends without STOP", true),
            (b"\x80\x02K\x01", 4, "ends without STOP", true),
            (
                b"\x80\x02X\xff\xff\xff\x7f",
                2,
                "needs 2147483647 bytes, but only 0 remain",
                true,
            ),
            (
                b"\x80\x02h\x05",
                2,
                "memo entry 5, which was never stored",
                false,
            ),
            (b"\x80\x02t", 2, "no MARK", false),
            (b"\x80\x02a.", 2, "pops an empty stack", false),
            (
                b"\x80\x02K\x01K\x02a.",
                6,
                "APPEND on a int, not a list",
                false,
            ),
            (b"\x80\x02I1\n.", 2, "text protocol", false),
            (b"\x80\x02\xff", 2, "unsupported opcode 0xff", false),
        ];
        for (input, offset, what, ran_out) in cases {
            let err = parse(input).unwrap_err();
            assert_eq!(err.offset, offset, "{err}");
            assert!(err.what.contains(what), "{err}");
            assert_eq!(err.ran_out, ran_out, "{err}");
        }
    }

    #[test]
    fn values_memo_entries_and_the_stack_are_bounded() {
        // None, POP: one value per two bytes, nothing left on the stack.
        let values = [&[0x80u8, 2][..], &b"N0".repeat(MAX_NODES + 1), b"N."].concat();
        let err = parse(&values).unwrap_err();
        assert_eq!(err.offset, 2 + 2 * MAX_NODES, "{err}");
        assert!(err.what.contains("more than 1048576 values"), "{err}");
        // BINGET of one value: the stack grows, the values do not.
        let stack = [&b"\x80\x02Nq\x00"[..], &b"h\x00".repeat(MAX_STACK), b"."].concat();
        let err = parse(&stack).unwrap_err();
        assert!(
            err.what.contains("more than 1048576 values on the stack"),
            "{err}"
        );
        // MEMOIZE of one value under ever new keys.
        let memo = [&b"\x80\x02N"[..], &[0x94].repeat(MAX_MEMO + 1), b"."].concat();
        let err = parse(&memo).unwrap_err();
        assert!(err.what.contains("more than 1048576 memo entries"), "{err}");
    }

    #[test]
    fn a_container_cannot_be_added_to_once_nested_so_no_cycle_forms() {
        // l = []; l.append(l)
        let err = parse(b"\x80\x02]q\x00h\x00a.").unwrap_err();
        assert!(err.what.contains("already placed inside"), "{err}");
        // d = {}; d['k'] = (d,)
        let err = parse(b"\x80\x02}q\x00X\x01\x00\x00\x00kh\x00\x85s.").unwrap_err();
        assert!(
            err.what.contains("SETITEM adds to a dict already placed"),
            "{err}"
        );
    }
}
