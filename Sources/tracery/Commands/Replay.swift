import ArgumentParser
import Foundation
import TraceryELF
import TraceryRecord

/// Opening a trace directory and naming its addresses (symbols are resolved at read time, from
/// the objects' files as the process file lists them).
enum TraceReading {
  /// Opens the trace and says on stderr, once per file, what could not be read.
  static func open(_ directory: String) throws -> Trace {
    let trace: Trace
    do { trace = try Trace(directory: directory) } catch { throw UserError("\(error)") }
    for line in trace.damageSummary {
      FileHandle.standardError.write(Data("tracery: warning: \(line)\n".utf8))
    }
    return trace
  }

  /// The calls of every thread (or of `tid`), named in full (what filters match) and labelled
  /// as `demangle` shows them; each distinct symbol is demangled once.
  static func calls(_ trace: Trace, tid: Int32? = nil, demangle: Demangler.Style = .simple) throws -> [ThreadCalls] {
    if let tid, !trace.threads.contains(where: { $0.tid == tid }) {
      throw UserError(
        "no thread \(tid) in the trace (threads: \(trace.threads.map { String($0.tid) }.joined(separator: ", ")))")
    }
    let symbolizer = Symbolizer(trace)
    var all = trace.calls { session, site in symbolizer.symbol(session: session, site: site) }
    if let tid { all = all.filter { $0.tid == tid } }
    var names: [String: (full: String, label: String)] = [:]
    for thread in all.indices {
      for index in all[thread].calls.indices {
        let symbol = all[thread].calls[index].name
        if names[symbol] == nil {
          names[symbol] = (Demangler.demangle(symbol), Demangler.name(symbol, style: demangle))
        }
        let named = names[symbol]!
        all[thread].calls[index].name = named.full
        all[thread].calls[index].label = named.label
      }
    }
    return all
  }

  /// The calls `filter` applies to, after checking that each -F / -N pattern names a recorded
  /// function (a pattern that matches nothing is a mistake worth saying).
  static func filteredCalls(
    _ trace: Trace, _ filter: CallFilter, tid: Int32? = nil, demangle: Demangler.Style = .simple
  ) throws -> [ThreadCalls] {
    let threads = try calls(trace, tid: tid, demangle: demangle)
    let names = Set(threads.flatMap { $0.calls.map(\.name) })
    for (flag, matchers) in [("-F", filter.only), ("-N", filter.hide)] {
      for matcher in matchers where !names.contains(where: matcher.matchesFunction) {
        throw UserError("no recorded function matches \(flag) '\(matcher.pattern)'")
      }
    }
    return threads
  }

  static func warnAboutDrops(_ trace: Trace) {
    let dropped = trace.droppedEvents
    if dropped > 0 {
      FileHandle.standardError.write(
        Data("tracery: \(dropped) events were dropped (buffer limit or disk full); the trace is incomplete\n".utf8))
    }
  }
}

/// Site → function symbol or name, per session: from the names saved with the trace
/// (`DIR/symbols`, `SymbolFile`), or, for objects without them (traces from before they were
/// saved), from the object's file on disk, with a warning when that file is not the one recorded.
final class Symbolizer {
  private struct Saved {
    let bias: UInt64
    let file: SymbolFile
  }
  private var saved: [String: [Saved]] = [:]
  private var tables: [String: SymbolTable] = [:]
  /// Objects named from disk although they changed since recording, not yet warned about.
  private var changed: [String: String] = [:]
  private var warned: Set<String> = []
  private let style: Demangler.Style

  init(_ trace: Trace, demangle style: Demangler.Style = .full) {
    self.style = style
    var symbolFiles: [String: SymbolFile?] = [:]
    var elfFiles: [String: ELFFile] = [:]
    for process in trace.processes {
      var inputs: [SymbolTable.Input] = []
      var own: [Saved] = []
      for object in process.objects {
        if let key = object.symbols {
          let file =
            symbolFiles[key]
            ?? Files.readText("\(trace.directory)/symbols/\(key).sym").flatMap { try? SymbolFile(text: $0) }
          symbolFiles.updateValue(file, forKey: key)
          if let file {
            own.append(Saved(bias: object.bias, file: file))
            continue
          }
        }
        guard let file = elfFiles[object.path] ?? (try? ELFFile(path: object.path)) else { continue }
        elfFiles[object.path] = file
        if let reason = Self.difference(object, file, recordedAt: process.startRealtimeNanoseconds) {
          changed[object.path] = reason
        }
        inputs.append(SymbolTable.Input(path: object.path, bias: object.bias, file: file))
      }
      saved[process.session] = own
      if !inputs.isEmpty { tables[process.session] = try? SymbolTable(inputs) }
    }
  }

  /// Why the file on disk may not be the object that was recorded, or nil.
  private static func difference(
    _ object: TraceryRecord.ProcessInfo.Object, _ file: ELFFile, recordedAt start: UInt64
  ) -> String? {
    let onDisk = file.buildID().map(TraceryRecord.ProcessInfo.Object.hex)
    if let recorded = object.buildID {
      return onDisk == recorded ? nil : "its build-id is not the recorded one (rebuilt since?)"
    }
    if let identity = FileIdentity(path: object.path), identity.modified > start {
      return "it was modified after it was recorded, and no names were saved with the trace"
    }
    if object.symbols != nil { return "its saved symbols are missing, and it has no build-id to check" }
    return nil
  }

  /// The symbol of the function at `site` as its object names it (or its address).
  func symbol(session: String, site: UInt64) -> String {
    for object in saved[session] ?? [] {
      if let name = object.file.name(atSite: site &- object.bias) { return name }
    }
    guard let table = tables[session], let index = table.function(containing: site) else {
      return "0x" + String(site, radix: 16)
    }
    let path = table.objects[table.functions[index].object].path
    if let reason = changed[path], warned.insert(path).inserted {
      FileHandle.standardError.write(Data("tracery: warning: \(path): \(reason); names may be wrong\n".utf8))
    }
    return table.functions[index].name
  }

  /// The function at `site` as `style` shows it.
  func name(session: String, site: UInt64) -> String {
    Demangler.name(symbol(session: session, site: site), style: style)
  }
}

extension Demangler.Style: ExpressibleByArgument {
  static let help = ArgumentHelp(
    "How to show C++ and Swift names: simple (no parameters or template arguments), full, or no (as mangled).",
    valueName: "simple|full|no")
}

/// The trace directory a reading command opens, and how its names are shown.
struct TraceLocation: ParsableArguments {
  @Option(name: .shortAndLong, help: "The trace directory.")
  var directory: String = "tracery.data"

  @Option(help: Demangler.Style.help) var demangle: Demangler.Style = .simple

  func open() throws -> Trace { try TraceReading.open(directory) }
}

struct Replay: ParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "Print the recorded calls as a call tree with durations, threads interleaved by time.")

  @OptionGroup var location: TraceLocation
  @Option(name: .long, help: "Only this thread.")
  var tid: Int32?
  @OptionGroup var filters: FilterOptions

  func run() throws {
    try reportingUserErrors {
      let trace = try location.open()
      let filter = try filters.filter(for: trace)
      print(
        Render.replay(
          try TraceReading.filteredCalls(trace, filter, tid: tid, demangle: location.demangle), filter: filter),
        terminator: "")
      TraceReading.warnAboutDrops(trace)
    }
  }
}

struct Report: ParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "Per function: total time, self time, calls, minimum and maximum.")

  @OptionGroup var location: TraceLocation
  @Option(name: .shortAndLong, help: "Sort by total, self, calls, min, max or name.")
  var sort: String = "total"
  @Flag(name: .long, help: "One table per thread.")
  var threads = false
  @OptionGroup var filters: FilterOptions

  func validate() throws {
    guard Render.SortKey(rawValue: sort) != nil else {
      throw ValidationError("--sort must be one of \(Render.SortKey.allCases.map(\.rawValue).joined(separator: ", "))")
    }
  }

  func run() throws {
    try reportingUserErrors {
      let trace = try location.open()
      let filter = try filters.filter(for: trace)
      let key = Render.SortKey(rawValue: sort)!
      let calls = try TraceReading.filteredCalls(trace, filter, demangle: location.demangle)
      if threads {
        for thread in calls {
          print("# thread \(thread.tid) (process \(thread.session))")
          print(Render.report(Render.sorted(Render.statistics([thread], filter: filter), by: key)))
        }
      } else {
        print(Render.report(Render.sorted(Render.statistics(calls, filter: filter), by: key)), terminator: "")
      }
      TraceReading.warnAboutDrops(trace)
    }
  }
}

struct Info: ParsableCommand {
  static let configuration = CommandConfiguration(abstract: "Describe a recording: command, processes, objects.")

  @OptionGroup var location: TraceLocation

  func run() throws {
    try reportingUserErrors {
      let trace = try location.open()
      var output = ""
      for (key, value) in trace.info {
        output += "# \(key.padding(toLength: 16, withPad: " ", startingAt: 0)): \(value)\n"
      }
      for line in trace.damageSummary { output += "# damaged         : \(line)\n" }
      for process in trace.processes {
        let threads = trace.threads.filter { $0.session == process.session }
        output += "# process \(process.session) (pid \(process.pid), parent \(process.parent)): \(process.executable)\n"
        output += "#   arguments : \(process.arguments.joined(separator: " "))\n"
        output += "#   traced    : \(process.tracedFunctions) functions\n"
        output +=
          "#   threads   : \(threads.count) (\(threads.reduce(0) { $0 + $1.events.count }) events, "
          + "\(threads.reduce(0) { $0 + $1.dropped }) dropped)\n"
        for object in process.objects {
          output +=
            "#   object    : \(object.path) build-id \(object.buildID ?? "-") at 0x\(String(object.bias, radix: 16))\n"
        }
      }
      print(output, terminator: "")
    }
  }
}

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
      let trace = try location.open()
      let filter = try filters.filter(for: trace)
      if chrome {
        var processes: [Int32: String] = [:]
        for process in trace.processes where processes[process.pid] == nil {
          processes[process.pid] = "\(process.executable.split(separator: "/").last ?? "?") (\(process.pid))"
        }
        print(
          Render.chrome(
            try TraceReading.filteredCalls(trace, filter, demangle: location.demangle), filter: filter,
            processes: processes),
          terminator: "")
      } else if folded {
        print(
          Render.folded(try TraceReading.filteredCalls(trace, filter, demangle: location.demangle), filter: filter),
          terminator: "")
      } else {
        let symbolizer = Symbolizer(trace, demangle: location.demangle)
        var output = ""
        for process in trace.processes {
          output +=
            "# session \(process.session): timestamps are time-stamp counter ticks, "
            + "\(process.ticksPerNanosecond) per nanosecond\n"
        }
        for thread in trace.threads {
          output +=
            "# session \(thread.session) thread \(thread.tid): \(thread.events.count) events, \(thread.dropped) dropped\n"
          for event in thread.events {
            let kind = event.kind == .entry ? "entry" : "exit "
            output +=
              "\(event.timestamp) \(thread.tid) [\(kind)] depth \(event.depth) "
              + "\(symbolizer.name(session: thread.session, site: event.site))"
              + (event.values.isEmpty ? "" : " " + event.values.map(\.text).joined(separator: ", ")) + "\n"
          }
        }
        print(output, terminator: "")
      }
      TraceReading.warnAboutDrops(trace)
    }
  }
}
