//! OpenAI's HTTP API as the gateway speaks it: the request bodies it reads and the responses and
//! stream chunks it writes.

mod request;
mod response;
pub mod tools;

pub use request::*;
pub use response::*;
