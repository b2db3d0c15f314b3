import ArgumentParser
import Foundation
import TraceryCore
import TraceryELF
import TraceryRecord

/// Options of `record` and `live` that decide what the agent patches and records, and the
/// program to run.
struct RecordOptions: ParsableArguments {
  @Option(name: .long, help: "Patch only the functions whose name matches this glob.")
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

  @Argument(parsing: .captureForPassthrough, help: "-- PROGRAM ARGS...")
  var command: [String] = []

  func validate() throws { _ = try valueSpecs() }

  /// The -A and -R specs, parsed.
  func valueSpecs() throws -> [ValueSpec] {
    do {
      return try argumentSpecs.map { try ValueSpec(parsing: $0, returnValue: false) }
        + returnSpecs.map { try ValueSpec(parsing: $0, returnValue: true) }
    } catch {
      throw ValidationError("\(error)")
    }
  }

  /// The specs as the agent reads them (TRACERY_ARGUMENTS).
  var agentSpecs: String? {
    let lines = argumentSpecs.map { "A " + $0 } + returnSpecs.map { "R " + $0 }
    return lines.isEmpty ? nil : lines.joined(separator: "\n")
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
    if isEmpty, let stored = trace.value("filter") {
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

struct Record: ParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "Run a program with the agent preloaded and record every call of its patchable functions.",
    discussion: """
      The program (and its libraries) must have patch sites: build with clang or gcc \
      -fpatchable-function-entry=5, or gcc -pg -mfentry -mnop-mcount -mrecord-mcount. The \
      program's exit status and signals pass through.
      """
  )

  @Option(
    name: .shortAndLong, help: "The trace directory (an old one is kept as DIR.old).")
  var directory: String = "tracery.data"
  @OptionGroup var filters: FilterOptions
  @OptionGroup var record: RecordOptions

  func validate() throws { try record.checkCommand(of: Self.self) }

  func run() throws {
    try reportingUserErrors {
      let status = try Recorder(options: record, filters: filters).run(directory: directory)
      try status.passThrough()
    }
  }
}

struct Live: ParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "Record a program into a temporary directory, then replay it.")

  @OptionGroup var filters: FilterOptions
  @OptionGroup var record: RecordOptions
  @Option(help: Demangler.Style.help) var demangle: Demangler.Style = .simple

  func validate() throws { try record.checkCommand(of: Self.self) }

  func run() throws {
    try reportingUserErrors {
      let directory = FileManager.default.temporaryDirectory.appendingPathComponent("tracery-live-\(getpid())").path
      defer { try? FileManager.default.removeItem(atPath: directory) }
      let status = try Recorder(options: record, filters: filters).run(directory: directory)
      try TraceReading.read(directory, filters: filters, demangle: demangle) {
        trace, threads, filter, symbolizer, output in
        Readers.replay(trace, threads: threads, filter: filter, names: symbolizer.names, output: output)
      }
      try status.passThrough()
    }
  }
}

/// How the traced program ended.
enum ProgramStatus {
  case exited(Int32)
  case signaled(Int32)

  /// Ends this process the same way: exit status, or the same signal.
  func passThrough() throws {
    switch self {
    case .exited(0): return
    case .exited(let code): throw ExitCode(code)
    case .signaled(let signal):
      fflush(nil)
      Foundation.signal(signal, SIG_DFL)
      kill(getpid(), signal)
      throw ExitCode(128 + signal)
    }
  }
}

/// Starts the program under the agent and waits for it.
struct Recorder {
  let options: RecordOptions
  let filters: FilterOptions

  func run(directory: String) throws -> ProgramStatus {
    var command = options.command
    if command.first == "--" { command.removeFirst() }
    guard let program = command.first else {
      throw UserError("no program given: tracery record [OPTIONS] -- PROGRAM [ARGS...]")
    }
    let path = try ProgramLocator.locate(program)
    try checkPatchSites(path)
    let agent = try Self.agentPath()
    let absolute = URL(fileURLWithPath: directory).standardizedFileURL.path
    // The files this process writes (info) take the trace's mode too (TraceFormat.fileMode).
    if options.shared { setenv("TRACERY_SHARED", "1", 1) }
    try prepare(absolute)
    var info = "tracery-trace 1\n"
    info += "command \(TextField.escape(command.joined(separator: " ")))\n"
    info += "program \(TextField.escape(path))\n"
    info += "start \(TextField.escape(ISO8601DateFormatter().string(from: Date())))\n"
    if !filters.arguments.isEmpty { info += "filter \(TextField.escape(filters.arguments.joined(separator: " ")))\n" }
    if let pattern = options.patch { info += "patch \(TextField.escape(pattern))\n" }
    for spec in options.argumentSpecs { info += "argument \(TextField.escape(spec))\n" }
    for spec in options.returnSpecs { info += "retval \(TextField.escape(spec))\n" }
    guard Files.write(info, to: absolute + "/info") else { throw UserError("cannot write \(absolute)/info") }

    var environment = Foundation.ProcessInfo.processInfo.environment
    environment["LD_PRELOAD"] = [agent, environment["LD_PRELOAD"]].compactMap { $0 }.filter { !$0.isEmpty }.joined(
      separator: ":")
    environment["TRACERY_DIR"] = absolute
    environment["TRACERY_MATCH"] = options.patch
    environment["TRACERY_DEPTH"] = filters.depth.map(String.init)
    environment["TRACERY_BUFFER_LIMIT"] = String(max(1, options.bufferLimit) << 20)
    environment["TRACERY_ARGUMENTS"] = options.agentSpecs
    // The agent links the Swift runtime, whose crash backtracer would otherwise catch the
    // program's own crashes: the program should die of its signal as it does untraced.
    environment["SWIFT_BACKTRACE"] = environment["SWIFT_BACKTRACE"] ?? "enable=no"
    environment["TRACERY_PATTERN_KIND"] = filters.match
    environment["TRACERY_SHARED"] = options.shared ? "1" : nil
    // Measured once here (10 ms) rather than in every process the program starts.
    environment["TRACERY_TICKS_PER_NS"] = String(TimeStampCounter.ticksPerNanosecond)
    let status = try Self.spawn(path: path, arguments: command, environment: environment)
    Self.trimEventFiles(in: absolute)
    let ending: String
    switch status {
    case .exited(let code): ending = "exit-status \(code)\n"
    case .signaled(let signal): ending = "signal \(signal)\n"
    }
    // The program's status passes through whatever became of the trace; a trace that is gone
    // is said, not left to be found missing.
    if !Files.append(ending, to: absolute + "/info") {
      FileHandle.standardError.write(
        Data("tracery: \(absolute)/info cannot be written (the trace directory was removed or moved?): no trace\n".utf8)
      )
    }
    return status
  }

  /// Cuts every event file of a process that has ended down to what it wrote (a file grows by
  /// whole 1 MiB chunks: a thousand short processes left a gigabyte of reserved, empty space).
  /// A process still running (a daemon the program left behind) may still write: its files stay.
  static func trimEventFiles(in directory: String) {
    for name in (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? [] where name.hasSuffix(".events")
    {
      guard let pid = Int32(name.split(separator: ".").first ?? ""), kill(pid, 0) != 0, errno == ESRCH else { continue }
      ThreadFile.trim(path: directory + "/" + name)
    }
  }

  /// The program or one of its libraries must have patch sites (and match --patch).
  private func checkPatchSites(_ path: String) throws {
    let file: ELFFile
    do { file = try ELFFile(path: path) } catch { throw UserError("\(path): \(error)") }
    // The agent is a shared library the dynamic loader preloads: a program without one (static)
    // would run untraced and leave an empty trace.
    guard file.segments.contains(where: { $0.type == ELFConstants.PT_DYNAMIC }) else {
      throw UserError(
        "\(path) is statically linked: the agent (a shared library) cannot be preloaded into it; "
          + "link it dynamically to trace it")
    }
    var inputs = [SymbolTable.Input(path: path, bias: 0, file: file)]
    for library in LibraryResolver(environment: Foundation.ProcessInfo.processInfo.environment).dependencies(
      of: path, file: file)
    {
      if let libraryPath = library.path, let libraryFile = try? ELFFile(path: libraryPath) {
        inputs.append(SymbolTable.Input(path: libraryPath, bias: 0, file: libraryFile))
      }
    }
    var patchable = 0
    var matching = 0
    let glob = try options.patch.map { pattern in
      do { return try Glob(pattern) } catch { throw UserError("invalid --patch pattern: \(error)") }
    }
    let specs = try options.valueSpecs()
    let kind = NameMatcher.Kind(rawValue: filters.match) ?? .regex
    let matchers = try specs.map { spec in
      do { return try NameMatcher(spec.pattern, kind: kind) } catch { throw UserError("\(error)") }
    }
    var specMatches = [Int](repeating: 0, count: specs.count)
    let filterMatchers = try filters.only.map { ("-F", $0) } + filters.hide.map { ("-N", $0) }
    var filterMatches = [Int](repeating: 0, count: filterMatchers.count)
    let compiledFilters = try filterMatchers.map { option, pattern in
      do { return try NameMatcher(pattern, kind: kind) } catch { throw UserError("\(option): \(error)") }
    }
    for input in inputs {
      guard let table = try? SymbolTable([input]) else { continue }
      let functions = table.patchableFunctions
      // Sites in no named function (a stripped object) are traced too, named by address.
      patchable += functions.count + table.orphanSites.count
      for index in functions {
        let name = table.functions[index].name
        if let glob, Demangler.forms(name).contains(where: glob.matches) { matching += 1 }
        for (at, matcher) in matchers.enumerated() where matcher.matchesFunction(name) { specMatches[at] += 1 }
        for (at, matcher) in compiledFilters.enumerated() where matcher.matchesFunction(name) { filterMatches[at] += 1 }
      }
    }
    guard patchable > 0 else {
      throw UserError(
        "\(path) has no patch sites: build it with clang or gcc -fpatchable-function-entry=5 "
          + "(or gcc -pg -mfentry -mnop-mcount -mrecord-mcount)")
    }
    if let pattern = options.patch, matching == 0 {
      throw UserError("no patchable function matches '\(pattern)' (\(patchable) patchable functions)")
    }
    if let index = specMatches.firstIndex(of: 0) {
      let option = index < options.argumentSpecs.count ? "-A" : "-R"
      throw UserError("\(option): no patchable function matches '\(specs[index].pattern)'")
    }
    // A record-time filter that can never show anything is a mistake: say so now, not in every reader.
    if let index = filterMatches.firstIndex(of: 0) {
      let (option, pattern) = filterMatchers[index]
      throw UserError("\(option): no patchable function matches '\(pattern)' (\(patchable) patchable functions)")
    }
  }

  private func prepare(_ directory: String) throws {
    let manager = FileManager.default
    // Never through a symbolic link: in a shared /tmp, another user could point it anywhere.
    var status = stat()
    if lstat(directory, &status) == 0, status.st_mode & S_IFMT == S_IFLNK {
      throw UserError("\(directory) is a symbolic link; not recording through it")
    }
    if manager.fileExists(atPath: directory) {
      guard
        manager.fileExists(atPath: directory + "/info")
          || (try? manager.contentsOfDirectory(atPath: directory))?.isEmpty == true
      else { throw UserError("\(directory) exists and is not a trace directory; not overwriting it") }
      let old = directory + ".old"
      try? manager.removeItem(atPath: old)
      do { try manager.moveItem(atPath: directory, toPath: old) } catch {
        throw UserError("cannot move \(directory) aside: \(error)")
      }
    }
    do {
      try manager.createDirectory(
        atPath: URL(fileURLWithPath: directory).deletingLastPathComponent().path,
        withIntermediateDirectories: true)
    } catch {
      throw UserError("cannot create \(directory): \(error)")
    }
    // The trace directory itself: new, this user's, private unless --shared.
    guard mkdir(directory, options.shared ? 0o755 : 0o700) == 0 else {
      throw UserError("cannot create \(directory): \(String(cString: strerror(errno)))")
    }
    chmod(directory, options.shared ? 0o755 : 0o700)
  }

  /// libtracery-agent.so next to this executable (SwiftPM builds both into one directory), or
  /// TRACERY_AGENT.
  static func agentPath() throws -> String {
    if let path = Foundation.ProcessInfo.processInfo.environment["TRACERY_AGENT"] { return path }
    let executable = URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath()
    let candidates = [
      Bundle.main.executableURL?.deletingLastPathComponent().appendingPathComponent("libtracery-agent.so").path,
      executable.deletingLastPathComponent().appendingPathComponent("libtracery-agent.so").path,
    ].compactMap { $0 }
    for candidate in candidates where FileManager.default.fileExists(atPath: candidate) { return candidate }
    throw UserError("the agent libtracery-agent.so is not next to tracery (\(candidates[0])): run 'swift build' first")
  }

  /// posix_spawn with the given environment; waits, ignoring SIGINT/SIGQUIT meanwhile (the
  /// program gets them from the terminal and decides).
  static func spawn(path: String, arguments: [String], environment: [String: String]) throws -> ProgramStatus {
    let argv = arguments.map { strdup($0) } + [nil]
    let envp = environment.map { strdup("\($0.key)=\($0.value)") } + [nil]
    defer {
      for pointer in argv + envp { free(pointer) }
    }
    var pid: pid_t = 0
    let result = posix_spawn(&pid, path, nil, nil, argv, envp)
    guard result == 0 else { throw UserError("cannot start \(path): \(String(cString: strerror(result)))") }
    let oldInterrupt = signal(SIGINT, SIG_IGN)
    let oldQuit = signal(SIGQUIT, SIG_IGN)
    defer {
      signal(SIGINT, oldInterrupt)
      signal(SIGQUIT, oldQuit)
    }
    var status: Int32 = 0
    while waitpid(pid, &status, 0) < 0 {
      guard errno == EINTR else { throw UserError("waiting for \(path): \(String(cString: strerror(errno)))") }
    }
    if status & 0x7f == 0 { return .exited((status >> 8) & 0xff) }
    return .signaled(status & 0x7f)
  }
}

extension Files {
  static func append(_ text: String, to path: String) -> Bool {
    guard let handle = FileHandle(forWritingAtPath: path) else { return false }
    defer { try? handle.close() }
    handle.seekToEndOfFile()
    handle.write(Data(text.utf8))
    return true
  }
}
