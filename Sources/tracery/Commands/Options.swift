import ArgumentParser
import Foundation
import TraceryCore
import TraceryELF
import TraceryRecord

/// Options of `record` and `live` that decide what the agent patches and records, and the
/// program to run.
struct RecordOptions: ParsableArguments {
  @Option(
    name: .long,
    help: """
      Patch only the functions whose name matches this glob; with relocation (--relocate, or a program \
      without patch sites), the libraries' functions it matches too.
      """)
  var patch: String?

  @Option(
    name: .customLong("buffer-limit"), help: "Megabytes of events per thread; later events are dropped and counted.")
  var bufferLimit: Int = 2048

  @Option(
    name: [.customShort("A"), .customLong("argument")],
    help: "Record arguments: PATTERN@arg1[/FMT][,arg2...] (FMT d, u, x or s; repeatable).")
  var argumentSpecs: [String] = []

  @Option(
    name: [.customShort("R"), .customLong("retval")],
    help: "Record the return value: PATTERN@retval[/FMT] (repeatable).")
  var returnSpecs: [String] = []

  @Flag(
    name: .long,
    help: "Let other users read the trace (directory 0755, files 0644); by default only you can (0700, 0600).")
  var shared = false

  @Flag(
    name: .long,
    help: """
      Also trace the program's functions that have no patch site, by moving their first instructions out of line \
      (a program without any patch site gets this without asking).
      """)
  var relocate = false

  @Flag(
    name: .long,
    inversion: .prefixedNo,
    help: """
      Record the program's calls to other objects through its PLT (printf, malloc, ...) as calls of NAME@plt, \
      by pointing its GOT at stubs of ours (sets LD_BIND_NOW for the program); on by default, as in uftrace.
      """)
  var libcall = true

  @Flag(
    name: [.customShort("l"), .customLong("nest-libcall")],
    help: """
      Also trace into the libraries: their functions (those --patch names, or all) are traced by moving their \
      first instructions out of line, nested where the program calls them.
      """)
  var nestLibcall = false

  @Flag(
    name: .long,
    help: """
      Also trace calls from code that is in no loaded object's text (a JIT's compiled code, and V8's builtins in \
      node). Off by default: V8 (node) and HotSpot (java) read their frames' return addresses and crash when one \
      is taken; other JITs' calls into traced functions are then recorded too (LuaJIT's).
      """)
  var jitCalls = false

  @Option(
    name: [.customShort("p"), .customLong("pid")],
    help: "Attach to this running process instead of starting a program; detach on Ctrl-C or after --duration.")
  var pid: Int32?

  @Option(name: .long, help: "With -p: record this long, then detach (e.g. 500ms, 5s).")
  var duration: String?

  @Argument(parsing: .captureForPassthrough, help: "-- PROGRAM ARGS...")
  var command: [String] = []

  func validate() throws {
    _ = try valueSpecs()
    if let duration {
      guard pid != nil else { throw ValidationError("--duration needs -p PID") }
      guard let nanoseconds = FilterOptions.nanoseconds(duration), nanoseconds > 0 else {
        throw ValidationError("invalid --duration '\(duration)' (use a number with ns, us, ms or s)")
      }
    }
    if pid != nil {
      guard command.isEmpty || command == ["--"] else {
        throw ValidationError("-p attaches to a running process: give no program")
      }
    }
  }

  /// --duration in nanoseconds.
  var durationNanoseconds: Double? { duration.flatMap(FilterOptions.nanoseconds) }

  /// The -A and -R specs, parsed.
  func valueSpecs() throws -> [ValueSpec] {
    do {
      return try argumentSpecs.map { try ValueSpec(parsing: $0, returnValue: false) }
        + returnSpecs.map { try ValueSpec(parsing: $0, returnValue: true) }
    } catch {
      throw ValidationError("\(error)")
    }
  }

  /// The passthrough argument also captures what the command itself should have parsed: a help
  /// flag (shown for `command`), or an unknown option (refused).
  func checkCommand(of command: ParsableCommand.Type) throws {
    guard let first = self.command.first, first.hasPrefix("-"), first != "--" else { return }
    if first == "-h" || first == "--help" { throw CleanExit.helpRequest(command) }
    throw ValidationError("Unknown option '\(first)'")
  }
}

/// Read-time filters, as uftrace spells them. At record time they are stored with the trace and
/// applied by every reader (except -D, which also limits what the agent records).
struct FilterOptions: ParsableArguments {
  @Option(name: .customShort("F"), help: "Show only this function and what it calls (pattern; repeatable).")
  var only: [String] = []

  @Option(name: .customShort("N"), help: "Hide this function and what it calls (pattern; repeatable).")
  var hide: [String] = []

  @Option(name: .customShort("D"), help: "Show calls at most this many levels deep.")
  var depth: Int?

  @Option(name: .customShort("t"), help: "Hide calls shorter than this (e.g. 500ns, 10us, 2ms, 1s).")
  var threshold: String?

  @Option(name: .long, help: "How -F and -N patterns match: regex (default) or glob.")
  var match: String = "regex"

  func validate() throws {
    guard NameMatcher.Kind(rawValue: match) != nil else { throw ValidationError("--match must be regex or glob") }
    if let threshold, Self.nanoseconds(threshold) == nil {
      throw ValidationError("invalid time threshold '\(threshold)' (use a number with ns, us, ms or s)")
    }
    if let depth, depth < 1 { throw ValidationError("-D must be at least 1") }
    for pattern in only + hide { _ = try filterPattern(pattern) }
  }

  private func filterPattern(_ pattern: String) throws -> NameMatcher {
    do { return try NameMatcher(pattern, kind: NameMatcher.Kind(rawValue: match) ?? .regex) } catch {
      throw ValidationError("\(error)")
    }
  }

  static func nanoseconds(_ text: String) -> Double? {
    let units: [(String, Double)] = [("ns", 1), ("us", 1e3), ("ms", 1e6), ("s", 1e9)]
    for (suffix, scale) in units where text.hasSuffix(suffix) {
      return Double(text.dropLast(suffix.count)).map { $0 * scale }
    }
    return Double(text)
  }

  var isEmpty: Bool { only.isEmpty && hide.isEmpty && depth == nil && threshold == nil }

  /// The filter these options give, or (when none is given) the one stored with the trace.
  func filter(for trace: Trace) throws -> CallFilter {
    if isEmpty, let stored = trace.info.filter {
      let options = try FilterOptions.parse(stored.split(separator: " ").map(String.init))
      return try options.filter()
    }
    return try filter()
  }

  func filter() throws -> CallFilter {
    var filter = CallFilter()
    filter.only = try only.map(filterPattern)
    filter.hide = try hide.map(filterPattern)
    filter.depth = depth
    filter.threshold = threshold.flatMap(Self.nanoseconds)
    return filter
  }

  /// The options as arguments, to store with a recording.
  var arguments: [String] {
    var result: [String] = []
    for pattern in only { result += ["-F", pattern] }
    for pattern in hide { result += ["-N", pattern] }
    if let depth { result += ["-D", String(depth)] }
    if let threshold { result += ["-t", threshold] }
    if !isEmpty { result += ["--match", match] }
    return result
  }
}

/// The trace directory a reading command opens, and how its names are shown.
struct TraceLocation: ParsableArguments {
  @Option(name: .shortAndLong, help: "The trace directory.")
  var directory: String = "tracery.data"

  @Option(help: Demangler.Style.help) var demangle: Demangler.Style = .simple

  func open() throws -> Trace { try TraceReading.open(directory) }
}

extension Demangler.Style: ExpressibleByArgument {
  static let help = ArgumentHelp(
    "How to show C++ and Swift names: simple (no parameters or template arguments), full, or no (as mangled).",
    valueName: "simple|full|no")
}
