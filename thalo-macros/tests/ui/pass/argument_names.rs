// Arguments may have any name, including the names of the generated code's locals.
use thalo::{commands, events, Aggregate, Error};

#[derive(Aggregate, Clone, Debug, Default)]
pub struct Log {
    #[identity]
    id: u32,
    lines: Vec<String>,
}

#[commands]
impl Log {
    pub fn write(
        &self,
        aggregate: String,
        result: String,
        events: String,
        command: String,
    ) -> Result<WrittenEvent, Error> {
        Ok(WrittenEvent {
            line: [aggregate, result, events, command].join(" "),
        })
    }

    #[inline]
    pub fn r#move(&self, r#type: u8) -> Result<MovedEvent, Error> {
        Ok(MovedEvent {
            event: r#type,
            aggregate: self.id,
        })
    }
}

#[events]
impl Log {
    pub fn written(&mut self, line: String) {
        self.lines.push(line);
    }

    pub fn moved(&mut self, event: u8, aggregate: u32) {
        self.lines.push(format!("{event} {aggregate}"));
    }
}

fn main() {
    let mut log = Log::new(4);
    let write = LogCommand::Write {
        aggregate: "a".into(),
        result: "r".into(),
        events: "e".into(),
        command: "c".into(),
    };
    for command in [write, LogCommand::Move { r#type: 2 }] {
        for event in log.handle(command).unwrap() {
            log.apply(event);
        }
    }
    assert_eq!(log.lines, ["a r e c", "2 4"]);
    assert_eq!(*log.id(), 4);
}
