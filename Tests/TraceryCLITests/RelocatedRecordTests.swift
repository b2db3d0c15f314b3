import Foundation
import Testing
import TraceryTestSupport

/// `tracery record --relocate` on programs built without any patch-site flag (as most programs
/// ship): the program's functions are traced by moving their first instructions out of line.
@Suite struct RelocatedRecordTests {
  @Test(arguments: [("gcc", ["-fomit-frame-pointer"]), ("clang", ["-fcf-protection=full"])])
  func programsWithoutNopsAreRecordedWithRelocate(compiler: String, flags: [String]) throws {
    let directory = try TestSupport.temporaryDirectory("record-relocate")
    defer { try? FileManager.default.removeItem(at: directory) }
    let program = directory.appendingPathComponent("program").path
    try TestSupport.compile(
      compiler: compiler, sources: [RecordCommandTests.programs.appendingPathComponent("tails.c").path],
      flags: ["-O2", "-pthread"] + flags, output: program)
    // Without --relocate such a program is refused, with the way out named.
    let refused = try RecordCommandTests.record(directory.appendingPathComponent("refused"), [program])
    #expect(refused.status != 0 && refused.stderr.contains("--relocate"), "\(refused.stderr)")
    let untraced = try TestSupport.run(program, [])
    let trace = directory.appendingPathComponent("trace")
    let traced = try RecordCommandTests.record(trace, [program], options: ["--relocate"])
    #expect(traced.status == untraced.status, "\(traced.stderr)")
    #expect(traced.stdout == untraced.stdout)
    // Every recorded function was entered as often as callgrind counts it.
    let counts = try RecordCommandTests.recordedCounts(trace)
    let expected = try CorpusTests.callgrind(program, [], in: directory)
    for name in ["main", "leaf", "mid", "top", "even", "odd"] {
      #expect(counts[name] != nil, "\(name) was not recorded: \(counts.keys.sorted())")
    }
    for (name, count) in counts {
      #expect(expected[name] == count, "\(name): recorded \(count), callgrind \(expected[name] ?? 0)")
    }
  }
}
