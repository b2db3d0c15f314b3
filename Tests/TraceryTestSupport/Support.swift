import Foundation

/// Helpers shared by the test targets: building C programs with the real compilers, running
/// processes, and locating the package's own files.
public enum TestSupport {
  /// The C library this process runs with, from /proc/self/maps read to its end with read(2)
  /// (Foundation's String(contentsOfFile:) came back cut under AddressSanitizer, whose shadow
  /// mappings make the file long).
  public static func cLibraryPath() -> String? {
    let descriptor = open("/proc/self/maps", O_RDONLY)
    guard descriptor >= 0 else { return nil }
    defer { close(descriptor) }
    var bytes: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 65536)
    while true {
      let count = chunk.withUnsafeMutableBytes { read(descriptor, $0.baseAddress, $0.count) }
      guard count > 0 else { break }
      bytes += chunk[0..<count]
    }
    return String(decoding: bytes, as: UTF8.self).split(separator: "\n")
      .compactMap { $0.split(separator: " ").last.map(String.init) }
      .first { $0.hasSuffix("/libc.so.6") }
  }

  /// The package root (three levels above this file).
  public static let packageRoot: URL = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
    .deletingLastPathComponent().deletingLastPathComponent()

  /// The directory that holds the built products (tracery, demo, tracery-testhost): the test
  /// bundle's own directory.
  public static let productsDirectory: URL = {
    var url = URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath()
    while url.path != "/" {
      if FileManager.default.fileExists(atPath: url.appendingPathComponent("tracery").path) { return url }
      url = url.deletingLastPathComponent()
    }
    return URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
  }()

  /// A fresh temporary directory.
  public static func temporaryDirectory(_ label: String = "tracery-test") throws -> URL {
    let url = FileManager.default.temporaryDirectory.appendingPathComponent("\(label)-\(UUID().uuidString)")
    try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
    return url
  }

  public struct ProcessResult: Sendable {
    public let status: Int32
    public let stdout: String
    public let stderr: String
  }

  /// How long `run` lets a process (and what it started) run before it kills them all:
  /// `TRACERY_TEST_TIMEOUT` seconds, else 15 minutes (the longest test, building the corpus
  /// programs, takes ~3). A hung traced child (a deadlock at fork, say) then fails its test
  /// instead of holding the whole suite until CI's limit.
  public static let processTimeout: Double =
    ProcessInfo.processInfo.environment["TRACERY_TEST_TIMEOUT"].flatMap(Double.init) ?? 900

  /// Runs `executable` with `arguments` and returns its status and output. Past `timeout`
  /// seconds the process and every process it started are killed (SIGKILL), and the result's
  /// standard error says so.
  @discardableResult
  public static func run(
    _ executable: String, _ arguments: [String], environment: [String: String]? = nil,
    timeout: Double = processTimeout
  ) throws -> ProcessResult {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: executable)
    process.arguments = arguments
    if let environment { process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 } }
    let out = Pipe()
    let err = Pipe()
    process.standardOutput = out
    process.standardError = err
    try process.run()
    // Killed with every descendant: a grandchild that hangs keeps the pipes open.
    let watchdog = Watchdog(pid: process.processIdentifier, timeout: timeout)
    // Read both pipes fully before waiting, so a chatty child never blocks on a full pipe.
    let errData = LockedData()
    let errThread = Thread { errData.set(err.fileHandleForReading.readDataToEndOfFile()) }
    errThread.start()
    let outData = out.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    while !errData.done { usleep(1000) }
    let timedOut = watchdog.stop()
    return ProcessResult(
      status: process.terminationStatus, stdout: String(decoding: outData, as: UTF8.self),
      stderr: String(decoding: errData.value, as: UTF8.self)
        + (timedOut
          ? "\n[TestSupport.run: \(executable) ran past \(timeout) s; it and its descendants were killed]\n" : ""))
  }

  /// Runs `executable` with its standard output into `output` (a file path) and returns its
  /// exit status and its peak resident memory in KiB, measured by `peak` (a small C program,
  /// Tests/TraceryCLITests/Programs/peak.c, built once): the memory of whatever forks a command
  /// counts as the command's own, and the test runner is large.
  public static func runMeasured(_ executable: String, _ arguments: [String], output: String) throws -> (
    status: Int32, peakKiB: Int
  ) {
    let peak = try peakProgram.get()
    let result = try run("/bin/sh", ["-c", "exec \"$0\" \"$@\" > '\(output)'", peak, executable] + arguments)
    guard let line = result.stderr.split(separator: "\n").last(where: { $0.hasPrefix("peak-kib ") }),
      let kib = Int(line.dropFirst(9))
    else { throw CompileError(description: "no peak measured: \(result.stderr)") }
    return (result.status, kib)
  }

  static let peakProgram: Result<String, any Error> = Result {
    let source = packageRoot.appendingPathComponent("Tests/TraceryCLITests/Programs/peak.c").path
    let output = try temporaryDirectory("peak").appendingPathComponent("peak").path
    try compile(compiler: "clang", sources: [source], flags: ["-O2"], output: output)
    return output
  }

  /// Finds a tool on PATH.
  public static func which(_ tool: String) -> String? {
    for directory in (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin").split(separator: ":") {
      let path = "\(directory)/\(tool)"
      if FileManager.default.isExecutableFile(atPath: path) { return path }
    }
    return nil
  }

  public struct CompileError: Error, CustomStringConvertible {
    public let description: String
    public init(description: String) { self.description = description }
  }

  /// Compiles C `sources` with `compiler` (gcc or clang) into `output`.
  public static func compile(
    compiler: String, sources: [String], flags: [String], output: String
  ) throws {
    guard let path = which(compiler) else { throw CompileError(description: "\(compiler) not found on PATH") }
    let result = try run(path, flags + sources + ["-o", output])
    guard result.status == 0 else {
      throw CompileError(description: "\(compiler) \(flags.joined(separator: " ")) failed:\n\(result.stderr)")
    }
  }

  /// Writes a C file of `count` functions `<prefix><i>(long x)` returning `x * (i % 97 + 3) + i`,
  /// and a table `<prefix>table` of pointers to all of them.
  public static func writeGeneratedFunctions(count: Int, prefix: String, to path: String) throws {
    var text = "typedef long (*tracery_fn)(long);\n"
    text.reserveCapacity(count * 64)
    for index in 0..<count {
      text += "long \(prefix)\(index)(long x) { return x * \(index % 97 + 3) + \(index); }\n"
    }
    text += "tracery_fn \(prefix)table[\(count)] = {"
    text += (0..<count).map { "\(prefix)\($0)" }.joined(separator: ",")
    text += "};\nlong \(prefix)count = \(count);\n"
    try text.write(toFile: path, atomically: true, encoding: .utf8)
  }

  /// The `key=value` fields of a result line (the first of each key).
  public static func fields(of text: String) -> [String: String] {
    Dictionary(
      text.split(whereSeparator: \.isWhitespace).compactMap { field -> (String, String)? in
        let parts = field.split(separator: "=")
        return parts.count == 2 ? (String(parts[0]), String(parts[1])) : nil
      }
    ) { first, _ in first }
  }

  /// The value generated function `index` returns for `x`.
  public static func generatedValue(index: Int, x: Int) -> Int { x * (index % 97 + 3) + index }

  /// Iterations for a storm test: `TRACERY_STORM_ITERATIONS` if set, else `long` under
  /// `TRACERY_LONG_TESTS`, else `default`.
  public static func stormIterations(default short: Int, long: Int) -> Int {
    if let text = ProcessInfo.processInfo.environment["TRACERY_STORM_ITERATIONS"], let value = Int(text) {
      return value
    }
    return longTests ? long : short
  }

  /// Whether long storm runs were asked for (TRACERY_LONG_TESTS set, and not to "", "0" or "no").
  public static var longTests: Bool {
    guard let value = ProcessInfo.processInfo.environment["TRACERY_LONG_TESTS"] else { return false }
    return !["", "0", "no", "false"].contains(value.lowercased())
  }
}

private final class LockedData: @unchecked Sendable {
  // @unchecked: every access goes through `lock`.
  private let lock = NSLock()
  private var data = Data()
  private var finished = false

  func set(_ value: Data) {
    lock.lock()
    data = value
    finished = true
    lock.unlock()
  }

  var done: Bool {
    lock.lock()
    defer { lock.unlock() }
    return finished
  }

  var value: Data {
    lock.lock()
    defer { lock.unlock() }
    return data
  }
}

/// Kills a process and all its descendants once `timeout` seconds have passed, unless stopped
/// first (`TestSupport.run`). Its thread polls ten times a second.
private final class Watchdog: @unchecked Sendable {
  // @unchecked: `stopped` and `fired` are touched under `lock` only.
  private let lock = NSLock()
  private var stopped = false
  private var fired = false

  init(pid: Int32, timeout: Double) {
    let deadline = Date().addingTimeInterval(timeout)
    Thread { [self] in
      while true {
        usleep(100_000)
        lock.lock()
        defer { lock.unlock() }
        if stopped { return }
        if Date() >= deadline {
          fired = true
          Self.killTree(pid)
          return
        }
      }
    }.start()
  }

  /// Stops watching; whether it had killed the process.
  func stop() -> Bool {
    lock.lock()
    defer { lock.unlock() }
    stopped = true
    return fired
  }

  /// SIGKILL to `root` and every process descending from it, found through /proc (all of them
  /// first: a process killed first would leave its children to init).
  static func killTree(_ root: Int32) {
    var parents: [Int32: Int32] = [:]
    for entry in (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? [] {
      guard let pid = Int32(entry),
        let stat = try? String(contentsOfFile: "/proc/\(entry)/stat", encoding: .utf8),
        let close = stat.lastIndex(of: ")")
      else { continue }
      // pid (comm) state ppid ...: comm may hold spaces and parentheses.
      let fields = stat[stat.index(after: close)...].split(separator: " ")
      if fields.count > 1, let parent = Int32(fields[1]) { parents[pid] = parent }
    }
    var tree: Set<Int32> = [root]
    var grew = true
    while grew {
      grew = false
      for (pid, parent) in parents where tree.contains(parent) && !tree.contains(pid) {
        tree.insert(pid)
        grew = true
      }
    }
    for pid in tree { kill(pid, SIGKILL) }
  }
}
