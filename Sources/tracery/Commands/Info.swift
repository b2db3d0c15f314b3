import ArgumentParser
import Foundation
import TraceryELF
import TraceryRecord

struct Info: ParsableCommand {
  static let configuration = CommandConfiguration(abstract: "Describe a recording: command, processes, objects.")

  @OptionGroup var location: TraceLocation

  func run() throws {
    try reportingUserErrors {
      let trace = try location.open()
      var output = ""
      for (key, value) in trace.info.fields {
        output += "# \(key.padding(toLength: 16, withPad: " ", startingAt: 0)): \(value)\n"
      }
      var damage = trace.damage
      var processes = ""
      for process in trace.processes {
        let threads = trace.threads.filter { $0.session == process.session }
        var events = 0
        for thread in threads {
          var cursor = EventCursor(thread)
          while cursor.next() != nil { events += 1 }
          damage += cursor.damage
        }
        processes +=
          "# process \(process.session) (pid \(process.pid), parent \(process.parent)): \(process.executable)\n"
        processes += "#   arguments : \(process.arguments.joined(separator: " "))\n"
        processes += "#   traced    : \(process.tracedFunctions) functions\(Self.shapes(of: process))\n"
        if process.untracedFunctions > 0 {
          processes += "#   untraced  : \(process.untracedFunctions) functions (no site could be made)\n"
        }
        processes += "#   ended     : \(Self.ending(of: process, in: trace))\n"
        processes +=
          "#   threads   : \(threads.count) (\(events) events, \(threads.total { $0.dropped }) dropped)\n"
        let foreign = threads.total { $0.foreignCalls }
        if foreign > 0 {
          processes +=
            "#   jit calls : \(foreign) calls from a JIT's code left untraced "
            + "(record --jit-calls records them)\n"
        }
        if !process.unrecordedThreads.isEmpty {
          let list = process.unrecordedThreads.map(String.init).joined(separator: " ")
          processes +=
            "#   unrecorded: threads \(list) could not make their files (the program changed its user or root "
            + "before they began): their events are not in the trace\n"
        }
        for object in process.objects {
          processes +=
            "#   object    : \(object.path) build-id \(object.buildID ?? "-") at 0x\(String(object.bias, radix: 16))\n"
        }
      }
      for line in Trace.summary(of: damage) { output += "# damaged         : \(line)\n" }
      if damage.isEmpty { output += "# damaged         : none (every sealed chunk's checksum matches)\n" }
      print(output + processes, terminator: "")
    }
  }

  /// How a process image's recording ended, from its process file's `end` line.
  /// How the traced functions were reached, when any were not at a NOP: " (3 relocated, 1
  /// through an int3)".
  static func shapes(of process: TracedProcess) -> String {
    var parts: [String] = []
    if process.relocatedFunctions > 0 { parts.append("\(process.relocatedFunctions) relocated") }
    if process.trappedFunctions > 0 { parts.append("\(process.trappedFunctions) through an int3") }
    return parts.isEmpty ? "" : " (\(parts.joined(separator: ", ")))"
  }

  static func ending(of process: TracedProcess, in trace: Trace) -> String {
    if process.ended { return "exit ran (the exiting thread's events sealed)" }
    if let thread = process.sandboxedBy {
      return
        "sandboxed: thread \(thread) installed a seccomp filter, and the recorder made no system call after it "
        + "(each thread wrote to the end of the chunk it had; later events dropped and counted)"
    }
    let parts = process.session.split(separator: ".")
    if parts.count == 2, let generation = Int(parts[1]),
      trace.processes.contains(where: { $0.session == "\(parts[0]).\(generation + 1)" })
    {
      return "replaced by exec (its threads' last chunks unsealed)"
    }
    return "without its exit (killed, crashed or still running): its threads' last chunks unsealed"
  }
}
