import Foundation
import TraceryRecord

/// The benchmarks' stand-in for a real call-heavy program: thousands of distinct functions, a
/// binary call tree through them and deep chains, built like a shipped program (clang -O2,
/// -fpatchable-function-entry=5). Every function counts its calls (`calls`), and each call site
/// is kept a real call (an empty asm between the calls stops -O2 from turning recursion into
/// loops), so the program's count is the number of entries a tracer must record.
enum GeneratedProgram {
  static let functions = 2_000
  static let chain = 200

  /// `stamp(word)`: with TRACERY_FLOOR defined, what a recorded call's event costs at least
  /// (an `rdtsc`, two words into a small ring: no trampoline, no fresh pages); else nothing.
  /// With TRACERY_FLOOR_BRANCHES too, two taken jumps follow, at their own addresses in every
  /// copy (`stamp` is inlined): four a call, as many as a recorder's per-function code takes
  /// (`Variant.floorBranches`). The benchmarks' C programs call it at each function's entry and
  /// before each return.
  static let floorStamp = """
    #ifdef TRACERY_FLOOR
    static unsigned long ring[8192], position;
    static inline void stamp(unsigned long word) {
      unsigned int low, high;
      __asm__ volatile("rdtsc" : "=a"(low), "=d"(high));
      ring[position++ & 8191] = word;
      ring[position++ & 8191] = (unsigned long)high << 32 | low;
    #ifdef TRACERY_FLOOR_BRANCHES
      __asm__ volatile("jmp 1f\\n.skip 8, 0xcc\\n1: jmp 2f\\n.skip 8, 0xcc\\n2:");
    #endif
    }
    #else
    #define stamp(word) ((void)0)
    #endif

    """

  static var source: String {
    var text = """
      #include <stdio.h>
      #include <stdlib.h>
      #include <time.h>
      static long calls;
      #define NOINLINE __attribute__((noinline))
      \(floorStamp)
      """
    for index in 0..<functions { text += "NOINLINE long f\(index)(long x, int d);\n" }
    for index in 0...chain { text += "NOINLINE long c\(index)(long x);\n" }
    for index in 0..<functions {
      let a = (index * 7 + 1) % functions
      let b = (index * 13 + 5) % functions
      text += """
        NOINLINE long f\(index)(long x, int d) {
          stamp(\(index));
          calls++;
          if (d <= 0) {
            stamp(\(index));
            return x + \(index);
          }
          long r = f\(a)(x + 1, d - 1);
          __asm__ volatile("" : "+r"(r));
          long s = f\(b)(x ^ r, d - 1);
          __asm__ volatile("" : "+r"(s));
          stamp(\(index));
          return r + s;
        }

        """
    }
    for index in 0..<chain {
      text +=
        "NOINLINE long c\(index)(long x) { stamp(\(index)); calls++; long r = c\(index + 1)(x + 1); __asm__ volatile(\"\" : \"+r\"(r)); stamp(\(index)); return r + 1; }\n"
    }
    text += "NOINLINE long c\(chain)(long x) { stamp(\(chain)); calls++; stamp(\(chain)); return x; }\n"
    text += """
      typedef long (*tree)(long, int);
      static tree roots[] = {f0, f1, f2, f3, f4, f5, f6, f7};
      int main(int argc, char **argv) {
        int depth = argc > 1 ? atoi(argv[1]) : 16, rounds = argc > 2 ? atoi(argv[2]) : 32;
        long total = 0;
        for (int r = 0; r < rounds; r++) total += roots[r % 8](r, depth) + c0(r);
        printf("calls %ld result %ld\\n", calls, total);
        return 0;
      }

      """
    return text
  }

  /// What `build` makes: the program, or a variant of it run untraced as a floor.
  enum Variant: CaseIterable {
    /// The program the tracers record.
    case plain
    /// Each function takes the two time stamps of a recorded call itself (inline `rdtsc`,
    /// stored into a small ring): the floor under any recorder that times each call.
    case floor
    /// The floor, and four taken jumps per call besides, each at its own address in every
    /// function: what the processor charges a program of this size for the branches of a
    /// recorder's per-function code (a site's `jmp` to its stub, the stub's calls of the entry
    /// and of the body, its `jmp` to the return code: `GraphEmitter`'s stub). The jumps go to
    /// the next bytes but one, so they cost only their place in the branch predictor: ~1 ns a
    /// call in a program of 16 functions, ~19 in this one (the bench's method, BENCHMARKS.md).
    case floorBranches

    var file: String {
      switch self {
      case .plain: "generated"
      case .floor: "generated-floor"
      case .floorBranches: "generated-floor-branches"
      }
    }

    var flags: [String] {
      switch self {
      case .plain: []
      case .floor: ["-DTRACERY_FLOOR"]
      case .floorBranches: ["-DTRACERY_FLOOR", "-DTRACERY_FLOOR_BRANCHES"]
      }
    }
  }

  /// Builds the program's `variant` into `directory` (once per source) and returns its path.
  static func build(in directory: String, variant: Variant = .plain) throws -> String {
    try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
    let sourcePath = directory + "/generated.c"
    let program = directory + "/" + variant.file
    let text = source
    if (try? String(contentsOfFile: sourcePath, encoding: .utf8)) != text {
      try text.write(toFile: sourcePath, atomically: true, encoding: .utf8)
      for stale in Variant.allCases { try? FileManager.default.removeItem(atPath: directory + "/" + stale.file) }
    }
    if !FileManager.default.fileExists(atPath: program) {
      try GeneratedLibrary.clang(
        ["-O2", "-fpatchable-function-entry=5"] + variant.flags + [sourcePath, "-o", program], building: sourcePath)
    }
    return program
  }

  /// The calls one run makes, as the program reports them ("calls N ...").
  static func calls(in output: String) -> Int? {
    let fields = output.split(whereSeparator: { $0 == " " || $0 == "\n" })
    guard let index = fields.firstIndex(of: "calls"), index + 1 < fields.count else { return nil }
    return Int(fields[index + 1])
  }

  /// Entry events below `main` (depth 1 and deeper) in the event files of a directory the agent
  /// wrote (every thread): the calls the benchmark programs count. Library calls (`NAME@plt`,
  /// recorded by default) are counted only when asked.
  static func recordedEntries(in directory: String, minimumDepth: Int = 1, countingLibraryCalls: Bool = false) throws
    -> Int
  {
    // The stubs' sites: each process file's `[library calls]` object (its bias the stubs' block,
    // its symbol file their offsets).
    var libraryCalls = Set<UInt64>()
    for name in try FileManager.default.contentsOfDirectory(atPath: directory)
    where name.hasPrefix("process-") && !countingLibraryCalls {
      let process = try TracedProcess(text: try String(contentsOfFile: directory + "/" + name, encoding: .utf8))
      for object in process.objects where object.path == "[library calls]" {
        guard let key = object.symbols else { continue }
        let text = try String(contentsOfFile: "\(directory)/symbols/\(key).sym", encoding: .utf8)
        libraryCalls.formUnion(try SymbolFile(text: text).sites.map { $0.site &+ object.bias })
      }
    }
    var entries = 0
    for name in try FileManager.default.contentsOfDirectory(atPath: directory) where name.hasSuffix(".events") {
      guard let file = ThreadFile.open(path: directory + "/" + name, name: name).file else { continue }
      var cursor = EventCursor(file)
      while let event = cursor.next() {
        if event.kind == .entry && event.depth >= minimumDepth && !libraryCalls.contains(event.site) { entries += 1 }
      }
    }
    return entries
  }
}

/// A child process run to its end: wall time, status, standard output and error.
struct MeasuredRun {
  let seconds: Double
  let status: Int32
  let output: String
  let errors: String

  static func run(_ executable: String, _ arguments: [String], environment: [String: String] = [:]) throws
    -> MeasuredRun
  {
    let outputPath = NSTemporaryDirectory() + "tracery-bench-output-\(getpid())"
    let errorPath = outputPath + ".errors"
    defer {
      unlink(outputPath)
      unlink(errorPath)
    }
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    posix_spawn_file_actions_addopen(&actions, 1, outputPath, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
    posix_spawn_file_actions_addopen(&actions, 2, errorPath, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
    let merged = ProcessInfo.processInfo.environment.merging(environment) { $1 }
    let argv = ([executable] + arguments).map { strdup($0) } + [nil]
    let envp = merged.map { strdup("\($0.key)=\($0.value)") } + [nil]
    defer { for pointer in argv + envp { free(pointer) } }
    var pid: pid_t = 0
    let start = ContinuousClock.now
    let spawned = posix_spawn(&pid, executable, &actions, nil, argv, envp)
    guard spawned == 0 else { throw UserError("cannot start \(executable): \(String(cString: strerror(spawned)))") }
    var status: Int32 = 0
    while waitpid(pid, &status, 0) < 0 {
      guard errno == EINTR else { throw UserError("waitpid: \(String(cString: strerror(errno)))") }
    }
    let elapsed = ContinuousClock.now - start
    return MeasuredRun(
      seconds: Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18,
      status: (status >> 8) & 0xff, output: (try? String(contentsOfFile: outputPath, encoding: .utf8)) ?? "",
      errors: (try? String(contentsOfFile: errorPath, encoding: .utf8)) ?? "")
  }
}
