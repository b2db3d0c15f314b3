import Foundation
import Testing

@testable import TraceryELF

/// Inputs the fuzzer (scripts/fuzz.sh elf) found crashing, kept byte for byte in
/// Fuzz/Regressions/elf (the fuzzer also starts from them), fed through the fuzz target's own
/// path (`FuzzHarness.elf`): each must now be read or refused without a trap. Each file's name
/// says what it broke.
@Suite struct FuzzRegressionTests {
  @Test func everyCrashInputIsReadWithoutATrap() throws {
    let directory = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
      .appendingPathComponent("../../Fuzz/Regressions/elf").standardized
    let names = try FileManager.default.contentsOfDirectory(atPath: directory.path).sorted()
    #expect(names.count >= 5)
    var accepted = 0
    for name in names {
      let bytes = try [UInt8](Data(contentsOf: directory.appendingPathComponent(name)))
      if FuzzHarness.elf(bytes, directory: NSTemporaryDirectory()) { accepted += 1 }
    }
    // All but section-count-overflow get past the headers: the traps were further in.
    #expect(accepted == names.count - 1)
  }
}
