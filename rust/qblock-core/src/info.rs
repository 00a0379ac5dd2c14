//! Values for format-specific information (what `qemu-img info` prints
//! under `format-specific`), independent of any serialization.

#[derive(Debug, Clone, PartialEq)]
pub enum InfoValue {
    Bool(bool),
    Int(i64),
    UInt(u64),
    Str(String),
    List(Vec<InfoValue>),
    Map(Vec<(String, InfoValue)>),
}

impl From<bool> for InfoValue {
    fn from(v: bool) -> Self {
        InfoValue::Bool(v)
    }
}
impl From<u64> for InfoValue {
    fn from(v: u64) -> Self {
        InfoValue::UInt(v)
    }
}
impl From<u32> for InfoValue {
    fn from(v: u32) -> Self {
        InfoValue::UInt(v.into())
    }
}
impl From<&str> for InfoValue {
    fn from(v: &str) -> Self {
        InfoValue::Str(v.to_string())
    }
}
impl From<String> for InfoValue {
    fn from(v: String) -> Self {
        InfoValue::Str(v)
    }
}
