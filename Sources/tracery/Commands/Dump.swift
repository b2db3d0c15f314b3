import ArgumentParser
import Foundation
import TraceryELF
import TraceryRecord

struct Dump: ParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "Write the recording as Chrome trace-event JSON, folded stacks, or raw events.")

  @OptionGroup var location: TraceLocation
  @Flag(name: .long, help: "Chrome trace-event JSON (chrome://tracing, Perfetto).")
  var chrome = false
  @Flag(name: .long, help: "Folded stacks with self nanoseconds (flamegraph.pl input).")
  var folded = false
  @OptionGroup var filters: FilterOptions

  func validate() throws {
    if chrome && folded { throw ValidationError("choose one of --chrome and --folded") }
  }

  func run() throws {
    try reportingUserErrors {
      try TraceReading.read(location.directory, filters: filters, demangle: location.demangle) {
        trace, threads, filter, symbolizer, output in
        if chrome {
          var processes: [Int32: String] = [:]
          for process in trace.processes where processes[process.pid] == nil {
            processes[process.pid] = "\(process.executable.split(separator: "/").last ?? "?") (\(process.pid))"
          }
          return Readers.chrome(
            trace, threads: threads, filter: filter, names: symbolizer.names, processes: processes, output: output)
        }
        if folded {
          let (lines, damage) = Readers.folded(trace, threads: threads, filter: filter, names: symbolizer.names)
          for line in lines { output.append(line + "\n") }
          return damage
        }
        return Self.raw(trace, threads: threads, symbolizer: symbolizer, output: output)
      }
    }
  }

  /// Every event, thread by thread, as recorded: counter, tid, kind, depth, name, values.
  static func raw(_ trace: Trace, threads: [ThreadFile], symbolizer: Symbolizer, output: ByteOutput) -> [Damage] {
    for process in trace.processes {
      output.append(
        "# session \(process.session): timestamps are time-stamp counter ticks, "
          + "\(process.ticksPerNanosecond) per nanosecond\n")
    }
    var damage: [Damage] = []
    for thread in threads {
      var counter = EventCursor(thread)
      var count = 0
      while counter.next() != nil { count += 1 }
      output.append("# session \(thread.session) thread \(thread.tid): \(count) events, \(thread.dropped) dropped\n")
      var cursor = EventCursor(thread)
      while let event = cursor.next() {
        let kind = event.kind == .entry ? "entry" : "exit "
        output.append(
          "\(event.timestamp) \(thread.tid) [\(kind)] depth \(event.depth) "
            + "\(symbolizer.name(session: thread.session, site: event.site))"
            + (event.values.isEmpty ? "" : " " + event.values.map(\.text).joined(separator: ", ")) + "\n")
      }
      damage += cursor.damage
    }
    return damage
  }
}
