import Foundation
import Testing
import TraceryELF
import TraceryTestSupport

/// `.eh_frame` and exception tables, against readelf and compiled C++.
@Suite struct FrameTests {
  /// readelf's FDE ranges (`pc=START..END`), in file order.
  static func readelfRanges(_ path: String) throws -> [ClosedRange<UInt64>] {
    // (readelf exits with 1 over warnings about other sections; its FDE lines are what count.)
    let result = try TestSupport.run("/usr/bin/readelf", ["--debug-dump=frames", path])
    return result.stdout.split(separator: "\n").compactMap { line -> ClosedRange<UInt64>? in
      guard line.contains(" FDE "), let range = line.split(separator: "pc=").last else { return nil }
      let ends = range.split(separator: ".").filter { !$0.isEmpty }
      guard ends.count == 2, let start = UInt64(ends[0], radix: 16), let end = UInt64(ends[1], radix: 16) else {
        return nil
      }
      return start...end
    }
  }

  /// Every FDE of real objects (hand-written assembly in libc, C++ in libstdc++, Swift in the
  /// Swift runtime) as readelf lists them.
  @Test(arguments: ["libc.so.6", "libstdc++.so.6", "libswiftCore.so"])
  func descriptionsAreReadelfs(_ name: String) throws {
    let candidates = [
      "/lib/x86_64-linux-gnu/\(name)", "/usr/lib/x86_64-linux-gnu/\(name)", "/opt/swift/usr/lib/swift/linux/\(name)",
    ]
    let path = try #require(candidates.first { FileManager.default.fileExists(atPath: $0) })
    let table = try ELFFile(path: path).frameDescriptions()
    let expected = try Self.readelfRanges(path)
    #expect(table.complete)
    #expect(expected.count > 1_000)
    #expect(table.descriptions.map { $0.start...($0.start + $0.size) } == expected)
  }

  /// C++ built as it ships (g++ and clang++ -O2): the functions that catch have an LSDA, and
  /// their landing pads lie inside them; a function that only calls has none.
  @Test(arguments: ["g++", "clang++"])
  func landingPadsLieInsideTheirFunctions(compiler: String) throws {
    let directory = try TestSupport.temporaryDirectory("frames")
    defer { try? FileManager.default.removeItem(at: directory) }
    let source = directory.appendingPathComponent("catch.cpp").path
    try """
    #include <stdexcept>
    #include <cstdio>
    __attribute__((noinline)) int thrower(int x) { if (x > 2) throw std::runtime_error("big"); return x; }
    __attribute__((noinline)) int catcher(int x) {
      try { return thrower(x); } catch (const std::exception &) { return -1; }
    }
    __attribute__((noinline)) int plain(int x) { return x * 3; }
    int main(int argc, char **) { std::printf("%d %d\\n", catcher(argc), plain(argc)); return 0; }
    """.write(toFile: source, atomically: true, encoding: .utf8)
    let binary = directory.appendingPathComponent("catch").path
    try TestSupport.compile(compiler: compiler, sources: [source], flags: ["-O2"], output: binary)
    let file = try ELFFile(path: binary)
    let symbols = try file.functionSymbols()
    let table = file.frameDescriptions()
    #expect(table.complete)
    func description(of name: String) throws -> ELFFile.FrameDescription {
      let symbol = try #require(symbols.first { $0.name == name })
      return try #require(table.descriptions.first { $0.start == symbol.value }, "no FDE for \(name)")
    }
    // (g++ also makes _Z7catcheri.cold, with its own FDE and LSDA.)
    let catcher = try description(of: "_Z7catcheri")
    let lsda = try #require(catcher.lsda, "catcher has no LSDA")
    let pads = try #require(file.landingPads(lsda: lsda, functionStart: catcher.start))
    #expect(!pads.isEmpty)
    for pad in pads {
      #expect(pad > catcher.start && pad < catcher.start + catcher.size, "pad 0x\(String(pad, radix: 16))")
    }
    #expect(try description(of: "_Z5plaini").lsda == nil)
  }
}
