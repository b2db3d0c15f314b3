import Foundation
import Testing
import TraceryTestSupport

/// `tracery record --libcall`: the program's calls through its PLT, recorded as `NAME@plt` calls
/// (its GOT pointed at stubs of Tracery's; no code patched).
@Suite struct LibraryCallTests {
  static func build(_ name: String, in directory: URL, flags: [String] = []) throws -> String {
    let program = directory.appendingPathComponent(name).path
    try TestSupport.compile(
      compiler: "gcc", sources: [RecordCommandTests.programs.appendingPathComponent("\(name).c").path],
      flags: ["-O2", "-fpatchable-function-entry=5"] + flags, output: program)
    return program
  }

  /// The replay shows each library call where the program made it, as uftrace does.
  @Test func libraryCallsAppearWhereTheProgramMadeThem() throws {
    let directory = try TestSupport.temporaryDirectory("libcall")
    defer { try? FileManager.default.removeItem(at: directory) }
    let program = try Self.build("libcalls", in: directory)
    let trace = directory.appendingPathComponent("trace")
    let traced = try RecordCommandTests.record(trace, [program], options: ["--libcall"])
    #expect(traced.status == 0 && traced.stdout == "14\n", "\(traced.stdout)\(traced.stderr)")
    let replay = try TestSupport.run(OptimizedProgramTests.tracery, ["replay", "-d", trace.path])
    let tree = RecordCommandTests.trees(replay.stdout).values.first ?? []
    let measure = ["  measure() {", "    strlen@plt();", "  }"]
    #expect(
      tree == ["main() {"] + measure + measure + measure
        + ["  malloc@plt();", "  snprintf@plt();", "  puts@plt();", "  free@plt();", "}"],
      "\(replay.stdout)")
    // Without --libcall, none.
    let plain = directory.appendingPathComponent("plain")
    _ = try RecordCommandTests.record(plain, [program])
    #expect(try RecordCommandTests.recordedCounts(plain).keys.allSatisfy { !$0.hasSuffix("@plt") })
  }

  /// Functions that return twice or never (setjmp, longjmp, exit) are left to the program: a
  /// program that longjmps out of traced calls and starts threads runs as untraced, and its
  /// own functions' counts are callgrind's.
  @Test func aProgramThatLongjmpsAndStartsThreadsRunsAsUntraced() throws {
    let directory = try TestSupport.temporaryDirectory("libcall-tails")
    defer { try? FileManager.default.removeItem(at: directory) }
    let program = try Self.build("tails", in: directory, flags: ["-pthread"])
    let trace = directory.appendingPathComponent("trace")
    let traced = try RecordCommandTests.record(trace, [program], options: ["--libcall"])
    #expect(traced.status == 0 && traced.stdout == "120\n", "\(traced.stdout)\(traced.stderr)")
    let counts = try RecordCommandTests.recordedCounts(trace)
    #expect(counts["pthread_create@plt"] == 3 && counts["pthread_join@plt"] == 3, "\(counts)")
    #expect(counts["_setjmp@plt"] == nil && counts["longjmp@plt"] == nil)
    let expected = try CorpusTests.callgrind(program, [], in: directory)
    for (name, count) in counts where !name.hasSuffix("@plt") {
      #expect(expected[name] == count, "\(name): recorded \(count), callgrind \(expected[name] ?? 0)")
    }
  }
}
