import ArgumentParser
import Foundation
import TraceryCore
import TraceryELF
import TraceryRecord

/// Starts the program under the agent and waits for it.
struct Recorder {
  let options: RecordOptions
  let filters: FilterOptions

  func run(directory: String) throws -> ProgramStatus {
    // The counter's rate, measured across this start (`TimeStampCounter.Calibration`).
    let calibration = TimeStampCounter.Calibration()
    var command = options.command
    if command.first == "--" { command.removeFirst() }
    guard let program = command.first else {
      throw UserError("no program given: tracery record [OPTIONS] -- PROGRAM [ARGS...]")
    }
    let path = try ProgramLocator.locate(program)
    // A script runs as its interpreter: that program is the one checked (and traced).
    let relocate = try checkPatchSites(ProgramLocator.executable(behind: path))
    let agent = try Self.agentPath()
    let absolute = URL(fileURLWithPath: directory).standardizedFileURL.path
    // The files this process writes (info) take the trace's mode too (TraceFormat.fileMode).
    if options.shared { AgentEnvironment.requestShared() }
    try Self.prepare(absolute, shared: options.shared)
    let info = recordingInfo(command: command.joined(separator: " "), program: path, relocate: relocate)
    guard Files.write(info.text, to: absolute + "/info") else { throw UserError("cannot write \(absolute)/info") }

    var environment = Foundation.ProcessInfo.processInfo.environment
    // Colon-separated lists, without empty parts.
    func list(_ parts: String?...) -> String { parts.compactMap { $0 }.filter { !$0.isEmpty }.joined(separator: ":") }
    environment["LD_PRELOAD"] = list(agent, environment["LD_PRELOAD"])
    // Blank files for the program's processes to take rather than create (`BlankFiles`).
    let keeper = BlankFileKeeper(trace: absolute)
    var settings = agentEnvironment(directory: absolute, relocate: relocate)
    settings.blankSlots = keeper?.slots ?? 0
    settings.apply(to: &environment)
    // gcc's AddressSanitizer runtime (libasan.so) stops a program unless it comes first among
    // the preloaded libraries; the agent must come first, and forwards what ASan intercepts too
    // (sigaction, signal, dlopen).
    environment["ASAN_OPTIONS"] = list(environment["ASAN_OPTIONS"], "verify_asan_link_order=0")
    // (SWIFT_BACKTRACE is left as the user set it: the agent's Swift runtime is linked without
    // its crash backtracer (agent.c), so a traced Swift program's own backtracer acts as untraced.)
    // Measured once here rather than in every process the program starts (a rate already given
    // to this process is passed on).
    if getenv(TimeStampCounter.environmentKey) == nil {
      setenv(TimeStampCounter.environmentKey, String(calibration.rate()), 1)
    }
    environment[TimeStampCounter.environmentKey] = String(TimeStampCounter.ticksPerNanosecond)
    environment[XState.environmentKey] = XState.environmentValue
    let status: ProgramStatus
    do {
      defer { keeper?.stop() }
      status = try Self.spawn(path: path, arguments: command, environment: environment)
    }
    Self.trimEventFiles(in: absolute)
    let ending: String
    switch status {
    case .exited(let code): ending = RecordingInfo.endingLine(exitStatus: code)
    case .signaled(let signal): ending = RecordingInfo.endingLine(signal: signal)
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

  /// What the agent is asked to do, for a trace in `directory`. `relocate`: the program's
  /// functions without a patch site are traced by relocation (`--relocate`, or a program with
  /// no patch site at all: `checkPatchSites`).
  func agentEnvironment(directory: String, relocate: Bool? = nil) -> AgentEnvironment {
    var environment = AgentEnvironment(
      directory: directory, match: options.patch, depth: filters.depth, bufferLimit: max(1, options.bufferLimit) << 20)
    environment.argumentSpecs = options.argumentSpecs
    environment.returnSpecs = options.returnSpecs
    environment.patternKind = NameMatcher.Kind(rawValue: filters.match) ?? .regex
    environment.shared = options.shared
    // A program without patch sites is relocated; each process it starts decides for its own
    // program (a child with sites uses only them, as the program it starts would under its own
    // `tracery record`).
    environment.relocate = options.relocate
    environment.relocateWithoutSites = !options.relocate && relocate == true
    environment.libraryCalls = options.libcall
    environment.nestLibraryCalls = options.nestLibcall
    environment.jitCalls = options.jitCalls
    return environment
  }

  /// The trace's `info`: the command, its options.
  func recordingInfo(command: String, program: String, relocate: Bool? = nil) -> RecordingInfo {
    var info = RecordingInfo(command: command, program: program, start: ISO8601DateFormatter().string(from: Date()))
    if !filters.arguments.isEmpty { info.add("filter", filters.arguments.joined(separator: " ")) }
    if let pattern = options.patch { info.add("patch", pattern) }
    if relocate ?? options.relocate { info.add("relocate", "yes") }
    if options.libcall { info.add("libcall", "yes") }
    if options.nestLibcall { info.add("nest-libcall", "yes") }
    if options.jitCalls { info.add("jit-calls", "yes") }
    for spec in options.argumentSpecs { info.add("argument", spec) }
    for spec in options.returnSpecs { info.add("retval", spec) }
    return info
  }

  /// Cuts every event file of a process that has ended down to what it wrote (a file grows by
  /// whole 1 MiB chunks: a thousand short processes left a gigabyte of reserved, empty space).
  /// A process still running (a daemon the program left behind) may still write: its files stay.
  static func trimEventFiles(in directory: String) {
    for name in (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? [] where name.hasSuffix(".events")
    {
      guard let pid = Int32(name.split(separator: ".").first ?? ""), kill(pid, 0) != 0, errno == ESRCH else { continue }
      let path = directory + "/" + name
      // A spare file no thread took (made before the program dropped its privileges) is removed.
      if name.contains("-spare"), case (nil, nil) = ThreadFile.open(path: path, name: name) {
        unlink(path)
        continue
      }
      ThreadFile.trim(path: path)
    }
  }

  /// The program or one of its libraries must have something to trace (and match --patch).
  /// Returns whether the program's functions without a patch site are traced by moving their
  /// first instructions out of line: asked for (`--relocate`), or the program has no patch site
  /// of its own (built as programs ship: then that is how it is traced).
  private func checkPatchSites(_ path: String) throws -> Bool {
    let file: ELFFile
    do { file = try ELFFile(path: path) } catch { throw UserError("\(path): \(error)") }
    // The agent is a shared library the dynamic loader preloads: a program without one (static)
    // would run untraced and leave an empty trace.
    guard file.segments.contains(where: { $0.type == ELFConstants.PT_DYNAMIC }) else {
      throw UserError(
        "\(path) is statically linked: the agent (a shared library) cannot be preloaded into it; "
          + "link it dynamically to trace it")
    }
    let relocate = options.relocate || ((try? file.patchSiteRecords().isEmpty) ?? true)
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
    let filterMatchers = filters.only.map { ("-F", $0) } + filters.hide.map { ("-N", $0) }
    var filterMatches = [Int](repeating: 0, count: filterMatchers.count)
    let compiledFilters = try filterMatchers.map { option, pattern in
      do { return try NameMatcher(pattern, kind: kind) } catch { throw UserError("\(option): \(error)") }
    }
    for (position, input) in inputs.enumerated() {
      // --relocate: the program's own functions count whether or not they have a site (a
      // stripped program's from its call frames, as the agent finds them); with --patch (or
      // -l), its libraries' too (the agent relocates those the glob matches).
      let relocating =
        position == 0 ? relocate : (relocate && options.patch != nil) || options.nestLibcall
      let unnamed = relocating && position == 0 ? EntryPoints(file: input.file, bias: 0).unnamedFunctions : []
      guard
        let table = try? SymbolTable([
          SymbolTable.Input(path: input.path, bias: input.bias, file: input.file, unnamed: unnamed)
        ])
      else { continue }
      let functions =
        relocating
        ? table.functions.indices.filter { table.functions[$0].site != nil || table.functions[$0].size > 0 }
        : table.patchableFunctions
      // Sites in no named function (a stripped object) are traced too, named by address.
      patchable += functions.count + table.orphanSites.count
      // --libcall: the program's PLT imports are traced even when it has no site of its own.
      if options.libcall && position == 0 { patchable += (try? input.file.importSlots().count) ?? 0 }
      for index in functions {
        let name = table.functions[index].name
        if let glob, Demangler.anyForm(of: name, matches: glob.matches) { matching += 1 }
        for (at, matcher) in matchers.enumerated() where matcher.matchesFunction(name) { specMatches[at] += 1 }
        for (at, matcher) in compiledFilters.enumerated() where matcher.matchesFunction(name) { filterMatches[at] += 1 }
      }
    }
    guard patchable > 0 else { throw UserError("\(path) has no function to trace (no symbols, no call frames)") }
    if let pattern = options.patch, matching == 0 {
      // Where the libraries' functions are reached (-l, or --patch with relocation), a library
      // the program loads later may hold them (java's libjvm, `dlopen`ed by its launcher): said,
      // not refused.
      guard relocate || options.nestLibcall else {
        throw UserError("no patchable function matches '\(pattern)' (\(patchable) patchable functions)")
      }
      FileHandle.standardError.write(
        Data(
          ("tracery: no function matches '\(pattern)' yet (\(patchable) functions in \(path) and its libraries); "
            + "libraries it loads later are searched too\n").utf8))
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
    return relocate
  }

  /// Creates the trace directory (an old trace moved aside to DIR.old): new, this user's, private
  /// unless `shared`.
  static func prepare(_ directory: String, shared: Bool) throws {
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
    guard mkdir(directory, shared ? 0o755 : 0o700) == 0 else {
      throw UserError("cannot create \(directory): \(String(cString: strerror(errno)))")
    }
    chmod(directory, shared ? 0o755 : 0o700)
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

extension Files {
  /// Appends to an existing file, never through a symbolic link (the trace directory may belong
  /// to the traced program's user: `record -p` on another user's process).
  static func append(_ text: String, to path: String) -> Bool {
    let fd = open(path, O_WRONLY | O_APPEND | O_NOFOLLOW | O_CLOEXEC)
    guard fd >= 0 else { return false }
    defer { close(fd) }
    let bytes = Array(text.utf8)
    return bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) } == bytes.count
  }
}
