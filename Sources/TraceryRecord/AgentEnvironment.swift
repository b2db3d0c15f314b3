#if canImport(Glibc)
  import Glibc
#endif

/// What `tracery record` tells the agent it preloads, through environment variables: one type
/// for both sides (the CLI writes it with `apply`, the agent reads it with `current`).
///
///     TRACERY_DIR            the trace directory (required; without it the agent does nothing)
///     TRACERY_MATCH          a glob: trace only the functions whose names match it (--patch)
///     TRACERY_DEPTH          record calls only this many levels deep (-D)
///     TRACERY_BUFFER_LIMIT   bytes of events per thread before events are dropped (and counted)
///     TRACERY_ARGUMENTS      -A / -R specs, one per line as `A SPEC` or `R SPEC`
///     TRACERY_PATTERN_KIND   how their patterns match: regex (default) or glob
///     TRACERY_SHARED         1: trace files readable by others (record --shared)
///     TRACERY_RELOCATE       1: also the program's functions without patch sites, their first
///                            instructions moved out of line (record --relocate); auto: so in
///                            a process whose program records no patch site (`tracery record`
///                            of such a program: its children that have sites use only them)
///     TRACERY_LIBCALL        1: the program's calls through its PLT are recorded as calls of
///                            `NAME@plt` (record --libcall; the CLI also sets LD_BIND_NOW)
///     TRACERY_NEST_LIBCALL   1: the libraries' functions (those TRACERY_MATCH names, or all) are
///                            traced too, relocated (record -l/--nest-libcall)
///     TRACERY_JIT_CALLS      1: calls from a JIT's code (anonymous memory, V8's builtins in
///                            node's text: `KnownCode`) are traced too (record --jit-calls; by
///                            default they are left untraced, and counted: V8 and HotSpot walk
///                            their frames' return addresses)
///     TRACERY_BLANKS         how many blank files `tracery record` keeps beside the directory,
///                            for the agent to take rather than create its files (`BlankFiles`)
///
/// (The counter's rate travels as TRACERY_TICKS_PER_NS, read by TraceryCore's
/// `TimeStampCounter`, and the xsave layout as TRACERY_XSAVE, read by its `XState`.)
public struct AgentEnvironment: Sendable, Equatable {
  public var directory: String
  public var match: String?
  public var depth: Int?
  /// Bytes.
  public var bufferLimit: Int
  /// `-A` specs, then `-R` specs.
  public var argumentSpecs: [String] = []
  public var returnSpecs: [String] = []
  public var patternKind: NameMatcher.Kind = .regex
  public var shared = false
  public var relocate = false
  /// TRACERY_RELOCATE=auto: `relocate` decided by each process, for its own program.
  public var relocateWithoutSites = false
  public var libraryCalls = false
  public var nestLibraryCalls = false
  public var jitCalls = false
  public var blankSlots = 0

  public static let defaultBufferLimit = 2 << 30

  public init(directory: String, match: String? = nil, depth: Int? = nil, bufferLimit: Int = defaultBufferLimit) {
    self.directory = directory
    self.match = match
    self.depth = depth
    self.bufferLimit = bufferLimit
  }

  enum Key {
    static let directory = "TRACERY_DIR"
    static let match = "TRACERY_MATCH"
    static let depth = "TRACERY_DEPTH"
    static let bufferLimit = "TRACERY_BUFFER_LIMIT"
    static let arguments = "TRACERY_ARGUMENTS"
    static let patternKind = "TRACERY_PATTERN_KIND"
    static let shared = "TRACERY_SHARED"
    static let relocate = "TRACERY_RELOCATE"
    static let libraryCalls = "TRACERY_LIBCALL"
    static let nestLibraryCalls = "TRACERY_NEST_LIBCALL"
    static let jitCalls = "TRACERY_JIT_CALLS"
    static let blankSlots = "TRACERY_BLANKS"
  }

  /// Sets (or clears) every variable in `environment`.
  public func apply(to environment: inout [String: String]) {
    environment[Key.directory] = directory
    environment[Key.match] = match
    environment[Key.depth] = depth.map(String.init)
    environment[Key.bufferLimit] = String(bufferLimit)
    let lines = argumentSpecs.map { "A " + $0 } + returnSpecs.map { "R " + $0 }
    environment[Key.arguments] = lines.isEmpty ? nil : lines.joined(separator: "\n")
    environment[Key.patternKind] = patternKind.rawValue
    environment[Key.shared] = shared ? "1" : nil
    environment[Key.relocate] = relocate ? "1" : relocateWithoutSites ? "auto" : nil
    environment[Key.libraryCalls] = libraryCalls ? "1" : nil
    environment[Key.nestLibraryCalls] = nestLibraryCalls ? "1" : nil
    environment[Key.jitCalls] = jitCalls ? "1" : nil
    environment[Key.blankSlots] = blankSlots > 0 ? String(blankSlots) : nil
    // Library calls are followed through bound GOT slots: bind them all at load.
    if libraryCalls { environment["LD_BIND_NOW"] = "1" }
  }

  /// What this process was given; nil without a trace directory.
  public static func current() -> AgentEnvironment? {
    AgentEnvironment { name in getenv(name).map { String(cString: $0) } }
  }

  /// The settings as `NAME=VALUE` lines, for an agent attached to a running process (whose
  /// environment is the program's): `record -p` writes them to a file the agent reads. A value's
  /// lines (the -A/-R specs) become lines of the same name.
  public var settingsText: String {
    var variables: [String: String] = [:]
    apply(to: &variables)
    return variables.sorted { $0.key < $1.key }.flatMap { name, value in
      value.split(separator: "\n", omittingEmptySubsequences: false).map { "\(name)=\($0)\n" }
    }.joined()
  }

  /// Reads `settingsText`; nil without a trace directory.
  public init?(settingsText text: String) {
    var variables: [String: String] = [:]
    for line in text.split(separator: "\n") {
      guard let equals = line.firstIndex(of: "=") else { continue }
      let name = String(line[..<equals])
      let value = String(line[line.index(after: equals)...])
      variables[name] = variables[name].map { $0 + "\n" + value } ?? value
    }
    self.init { variables[$0] }
  }

  private init?(lookup value: (String) -> String?) {
    guard let directory = value(Key.directory), !directory.isEmpty else { return nil }
    self.init(
      directory: directory, match: value(Key.match), depth: value(Key.depth).flatMap { Int($0) },
      bufferLimit: value(Key.bufferLimit).flatMap { Int($0) } ?? Self.defaultBufferLimit)
    for line in (value(Key.arguments) ?? "").split(separator: "\n") where line.count > 2 {
      if line.hasPrefix("A ") { argumentSpecs.append(String(line.dropFirst(2))) }
      if line.hasPrefix("R ") { returnSpecs.append(String(line.dropFirst(2))) }
    }
    patternKind = value(Key.patternKind).flatMap(NameMatcher.Kind.init(rawValue:)) ?? .regex
    shared = value(Key.shared) == "1"
    relocate = value(Key.relocate) == "1"
    relocateWithoutSites = value(Key.relocate) == "auto"
    libraryCalls = value(Key.libraryCalls) == "1"
    nestLibraryCalls = value(Key.nestLibraryCalls) == "1"
    jitCalls = value(Key.jitCalls) == "1"
    blankSlots = value(Key.blankSlots).flatMap { Int($0) }.map { min(max($0, 0), 100) } ?? 0
  }

  /// Whether this process was asked to keep traces readable by others (the CLI sets it for its
  /// own files too).
  public static var sharedRequested: Bool { getenv(Key.shared).map { String(cString: $0) == "1" } ?? false }

  /// Asks for shared files in this process (the CLI, before it writes the trace's first file).
  public static func requestShared() { setenv(Key.shared, "1", 1) }
}
