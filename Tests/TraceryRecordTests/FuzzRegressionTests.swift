import Foundation
import Testing

@testable import TraceryRecord

/// Inputs the fuzzers (scripts/fuzz.sh events|texts) found crashing or hanging, kept byte for
/// byte in Fuzz/Regressions/TARGET (the fuzzers also start from them), fed through the fuzz
/// targets' own path (`FuzzHarness`). Each must now be read or refused, quickly and without a
/// trap.
@Suite(.timeLimit(.minutes(1))) struct RecordFuzzRegressionTests {
  static func inputs(_ target: String) throws -> [[UInt8]] {
    let directory = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
      .appendingPathComponent("../../Fuzz/Regressions/\(target)").standardized
    return try FileManager.default.contentsOfDirectory(atPath: directory.path).sorted().map {
      try [UInt8](Data(contentsOf: directory.appendingPathComponent($0)))
    }
  }

  @Test func eventFileInputs() throws {
    let inputs = try Self.inputs("events")
    #expect(!inputs.isEmpty)
    for input in inputs {
      let (events, damage) = FuzzHarness.eventFile(input, directory: NSTemporaryDirectory())
      // Read, or refused with a reason: never nothing and silence.
      #expect(events > 0 || !damage.isEmpty)
    }
  }

  @Test func textInputs() throws {
    let inputs = try Self.inputs("texts")
    #expect(!inputs.isEmpty)
    for input in inputs { FuzzHarness.text(input) }
  }

  /// The glob that took the recursive matcher exponential time: a run of stars before a literal
  /// the name lacks. Now linear in stars × name.
  @Test func manyStarsMatchQuickly() throws {
    let matcher = try NameMatcher(String(repeating: "*", count: 60) + "ns::*::push", kind: .glob)
    let name = String(repeating: "ns::Stack::", count: 20) + "pop"
    #expect(!matcher.matches(name))
    #expect(matcher.matches(name + "ns::x::push"))
  }
}
