import ArgumentParser
import Foundation
import TraceryELF
import TraceryRecord

/// Opening a trace directory, choosing its threads, naming its sites, and writing a reader's
/// output. Every reader streams (`Readers`, `TraceStream`): memory does not grow with the trace.
enum TraceReading {
  /// Opens the trace and says on stderr, once per file, what could not be read.
  static func open(_ directory: String) throws -> Trace {
    let trace: Trace
    do { trace = try Trace(directory: directory) } catch { throw UserError("\(error)") }
    warn(Trace.summary(of: trace.damage))
    return trace
  }

  static func warn(_ lines: [String]) {
    for line in lines { FileHandle.standardError.write(Data("tracery: warning: \(line)\n".utf8)) }
  }

  /// The threads to read: all, or `tid`'s (which must be in the trace).
  static func threads(_ trace: Trace, tid: Int32?) throws -> [ThreadFile] {
    guard let tid else { return trace.threads }
    let chosen = trace.threads.filter { $0.tid == tid }
    guard !chosen.isEmpty else {
      throw UserError(
        "no thread \(tid) in the trace (threads: \(trace.threads.map { String($0.tid) }.joined(separator: ", ")))")
    }
    return chosen
  }

  /// Checks that each -F / -N pattern names a traced function (one that matches nothing is a
  /// mistake worth saying before reading anything).
  static func check(_ filter: CallFilter, against symbolizer: Symbolizer) throws {
    guard !filter.only.isEmpty || !filter.hide.isEmpty else { return }
    let names = symbolizer.tracedNames
    for (flag, matchers) in [("-F", filter.only), ("-N", filter.hide)] {
      for matcher in matchers where !names.contains(where: matcher.matchesFunction) {
        throw UserError("no recorded function matches \(flag) '\(matcher.pattern)'")
      }
    }
  }

  /// Runs a reader over the trace in `directory`: `body` gets the trace, the chosen threads, the
  /// filter, the namer and the output, and returns the damage it found, which is said on stderr
  /// after the output (with the events that were dropped while recording).
  static func read(
    _ directory: String, tid: Int32? = nil, filters: FilterOptions, demangle: Demangler.Style,
    _ body: (Trace, [ThreadFile], CallFilter, Symbolizer, ByteOutput) throws -> [Damage]
  ) throws {
    let trace = try open(directory)
    let filter = try filters.filter(for: trace)
    let threads = try threads(trace, tid: tid)
    let symbolizer = Symbolizer(trace, demangle: demangle)
    try check(filter, against: symbolizer)
    let output = ByteOutput(fd: 1)
    let progress = Progress()
    TraceStream.progress = progress.show
    let damage = try body(trace, threads, filter, symbolizer, output)
    output.flush()
    progress.clear()
    warn(Trace.summary(of: damage))
    warnAboutDrops(trace)
  }

  static func warnAboutDrops(_ trace: Trace) {
    let dropped = trace.droppedEvents
    if dropped > 0 {
      FileHandle.standardError.write(
        Data(
          "tracery: \(dropped) events were dropped (buffer limit, full disk or file-size limit); the trace is incomplete\n"
            .utf8))
    }
  }
}

/// A progress line on stderr for a reader that has run more than a second, when stderr is a
/// terminal: "tracery: reading 42% (3.1 M events)", rewritten in place and cleared at the end.
final class Progress {
  private let start = ContinuousClock.now
  private let terminal = isatty(2) != 0
  private var shown = false

  func show(read: Int, estimated: Int) {
    guard terminal, ContinuousClock.now - start > .seconds(1) else { return }
    let percent = min(99, read * 100 / max(estimated, 1))
    let line = String(format: "\rtracery: reading %d%% (%.1f M events)", percent, Double(read) / 1e6)
    FileHandle.standardError.write(Data(line.utf8))
    shown = true
  }

  func clear() {
    if shown { FileHandle.standardError.write(Data("\r\u{1b}[K".utf8)) }
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

  private var named: [String: FunctionNames] = [:]

  /// The names of the function at `site`: each distinct symbol demangled once.
  func names(session: String, site: UInt64) -> FunctionNames {
    let symbol = symbol(session: session, site: site)
    if let known = named[symbol] { return known }
    let names = FunctionNames(
      symbol: symbol, full: Demangler.demangle(symbol), label: Demangler.name(symbol, style: style))
    named[symbol] = names
    return names
  }

  /// The full names of every traced function (every function with a patch site in the traced
  /// objects), demangled.
  var tracedNames: Set<String> {
    var result = Set<String>()
    for objects in saved.values {
      for object in objects { for (_, name) in object.file.sites { result.insert(Demangler.demangle(name)) } }
    }
    for table in tables.values {
      for index in table.patchableFunctions { result.insert(Demangler.demangle(table.functions[index].name)) }
    }
    return result
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
      try TraceReading.read(location.directory, tid: tid, filters: filters, demangle: location.demangle) {
        trace, threads, filter, symbolizer, output in
        Readers.replay(trace, threads: threads, filter: filter, names: symbolizer.names, output: output)
      }
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
      let key = Render.SortKey(rawValue: sort)!
      try TraceReading.read(location.directory, filters: filters, demangle: location.demangle) {
        trace, chosen, filter, symbolizer, output in
        let (tables, damage) = Readers.statistics(
          trace, threads: chosen, filter: filter, names: symbolizer.names, perThread: threads)
        for (thread, rows) in tables {
          if let thread { output.append("# thread \(thread.tid) (process \(thread.session))\n") }
          output.append(Render.report(Render.sorted(rows, by: key)) + (thread == nil ? "" : "\n"))
        }
        return damage
      }
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
        processes += "#   traced    : \(process.tracedFunctions) functions\n"
        processes += "#   ended     : \(Self.ending(of: process, in: trace))\n"
        processes +=
          "#   threads   : \(threads.count) (\(events) events, \(threads.reduce(0) { $0 + $1.dropped }) dropped)\n"
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
  static func ending(of process: TraceryRecord.ProcessInfo, in trace: Trace) -> String {
    if process.ended { return "exit ran (the exiting thread's events sealed)" }
    let parts = process.session.split(separator: ".")
    if parts.count == 2, let generation = Int(parts[1]),
      trace.processes.contains(where: { $0.session == "\(parts[0]).\(generation + 1)" })
    {
      return "replaced by exec (its threads' last chunks unsealed)"
    }
    return "without its exit (killed, crashed or still running): its threads' last chunks unsealed"
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
