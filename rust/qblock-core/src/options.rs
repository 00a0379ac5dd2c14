//! Creation options as name/value pairs, named as QEMU names them
//! (`size`, `backing_file`, `cluster_size`, ...). Python validates and fills
//! defaults; each driver takes the options it knows and the rest is an error,
//! so a misspelt or misplaced option never passes silently.

use crate::error::{invalid, Result};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptValue {
    Bool(bool),
    Int(u64),
    Str(String),
}

#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    values: BTreeMap<String, OptValue>,
}

impl CreateOptions {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn set(&mut self, key: &str, v: OptValue) -> &mut Self {
        self.values.insert(key.to_string(), v);
        self
    }
    pub fn with(mut self, key: &str, v: OptValue) -> Self {
        self.set(key, v);
        self
    }
    pub fn peek(&self, key: &str) -> Option<&OptValue> {
        self.values.get(key)
    }

    pub fn take_u64(&mut self, key: &str) -> Result<Option<u64>> {
        match self.values.remove(key) {
            None => Ok(None),
            Some(OptValue::Int(v)) => Ok(Some(v)),
            Some(OptValue::Str(s)) => s
                .parse::<u64>()
                .map(Some)
                .map_err(|_| invalid(format!("option '{key}' must be a non-negative integer, not '{s}'"))),
            Some(OptValue::Bool(_)) => Err(invalid(format!("option '{key}' must be an integer"))),
        }
    }

    pub fn take_bool(&mut self, key: &str) -> Result<Option<bool>> {
        match self.values.remove(key) {
            None => Ok(None),
            Some(OptValue::Bool(b)) => Ok(Some(b)),
            Some(OptValue::Str(s)) => match s.as_str() {
                "on" | "true" | "yes" | "1" => Ok(Some(true)),
                "off" | "false" | "no" | "0" => Ok(Some(false)),
                _ => Err(invalid(format!("option '{key}' must be on or off, not '{s}'"))),
            },
            Some(OptValue::Int(i)) => Ok(Some(i != 0)),
        }
    }

    pub fn take_str(&mut self, key: &str) -> Result<Option<String>> {
        match self.values.remove(key) {
            None => Ok(None),
            Some(OptValue::Str(s)) => Ok(Some(s)),
            Some(OptValue::Int(i)) => Ok(Some(i.to_string())),
            Some(OptValue::Bool(b)) => Ok(Some(if b { "on" } else { "off" }.into())),
        }
    }

    /// Fail on any option no one took.
    pub fn finish(&self, format: &str) -> Result<()> {
        match self.values.keys().next() {
            None => Ok(()),
            Some(k) => Err(invalid(format!("option '{k}' is not supported by the {format} format"))),
        }
    }
}
