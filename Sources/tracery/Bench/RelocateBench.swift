import Foundation
import TraceryCore
import TraceryELF
import TraceryX86

/// `tracery bench relocate`: how much of real objects Tracery can trace, and how fast it
/// decides. For every function of each object (its bytes from the file, by its symbol's size),
/// what `record --relocate` would do at start (one thread): its NOP site, a relocated prologue,
/// a trap site (int3 on its first instruction, with why it was not relocated), or nothing.
///
/// Objects: the C library, libstdc++, the Swift runtime and FoundationEssentials as this
/// process loaded them, this program (Swift, `-O`), and gzip built from Debian's sources with
/// `gcc -O2` and nothing else (fetched and built once into the cache when `apt-get source`
/// works; skipped otherwise).
///
/// Figures: `coverage-OBJECT`, n = functions, ns per function to decide (decode, relocate on
/// paper, sweep the function for branches into its first bytes, look up the object's entry
/// points), the time to find those entry points once for the object (`sweep_ms`: every function
/// decoded, landing pads read; `unswept`: functions it could not decode to their end), the counts and the
/// percentages of functions with room for the branch (5 bytes, after an endbr64) relocated and
/// traceable (relocated or trap).
struct RelocateBench {
  let runs: Int
  let cacheDirectory: String

  func run(_ report: BenchReport) throws {
    var objects: [(name: String, path: String)] = []
    let loaded = ProcessObjects.list().map(\.path)
    for (name, file) in [
      ("libc", "libc.so.6"), ("libstdc++", "libstdc++.so.6"), ("libswiftCore", "libswiftCore.so"),
      ("FoundationEssentials", "libFoundationEssentials.so"),
    ] {
      if let path = loaded.first(where: { $0.hasSuffix("/" + file) }) { objects.append((name, path)) }
    }
    objects.append(("tracery (swift -O)", URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().path))
    if let gzip = gzipBuild(report) { objects.append(("gzip (gcc -O2)", gzip)) }
    for object in objects { try survey(object.name, path: object.path, report) }
  }

  private func survey(_ name: String, path: String, _ report: BenchReport) throws {
    let file = try ELFFile(path: path)
    let symbols = try file.functionSymbols()
    let starts = Set(symbols.map(\.value)).sorted()
    let functions = symbols.compactMap { symbol -> ([UInt8], Int, UInt64)? in
      guard symbol.size > 0 else { return nil }
      let next = starts.firstIndex { $0 > symbol.value }.map { starts[$0] }
      let span = PatchSite.surveySpan(size: symbol.size, to: next, from: symbol.value)
      guard
        let code = file.bytes(atAddress: symbol.value, count: span)
          ?? file.bytes(atAddress: symbol.value, count: Int(symbol.size))
      else { return nil }
      return (code, Int(symbol.size), symbol.value)
    }
    // The object's entry points (branch targets from every function, landing pads): once per
    // object, timed apart.
    var entryPoints: EntryPoints?
    let sweepTime = medianNanoseconds(runs: runs) { entryPoints = EntryPoints(file: file, bias: 0) }
    var outcomes: [PatchSite.Survey] = []
    let time = medianNanoseconds(runs: runs) {
      outcomes = functions.map { code, size, address in
        code.withUnsafeBytes { PatchSite.survey(code: $0, size: size, entry: address, entryPoints: entryPoints) }
      }
    }
    var nop = 0
    var relocated = 0
    var trapped: [String: Int] = [:]
    var refused: [String: Int] = [:]
    var large = 0
    var largeRelocated = 0
    var largeTraceable = 0
    for ((code, size, _), outcome) in zip(functions, outcomes) {
      // Room for the 5-byte branch (after an endbr64, which stays).
      let isLarge = size - (code.starts(with: X86Instruction.endbr64) ? 4 : 0) >= 5
      if isLarge { large += 1 }
      switch outcome {
      case .nop:
        nop += 1
      case .relocated:
        relocated += 1
        if isLarge { largeRelocated += 1 }
      case .trap(let why):
        trapped["\(why)", default: 0] += 1
      case .refused(let why):
        refused["\(why)", default: 0] += 1
        continue
      }
      if isLarge { largeTraceable += 1 }
    }
    let traps = trapped.values.reduce(0, +)
    let percent = { (part: Int) in large == 0 ? 100 : 100 * Double(part) / Double(large) }
    report.figure(
      name: "coverage-\(name.split(separator: " ")[0])", n: functions.count, nsPerItem: time / Double(functions.count),
      extra: [
        "nop": Double(nop), "relocated": Double(relocated), "trap": Double(traps),
        "refused": Double(refused.values.reduce(0, +)), "relocated_pct_5": percent(largeRelocated),
        "traceable_pct_5": percent(largeTraceable), "sweep_ms": sweepTime / 1e6,
        "unswept": Double(entryPoints?.unswept ?? 0),
      ])
    func listed(_ counts: [String: Int]) -> String {
      counts.sorted { $0.value > $1.value }.map { "\($0.value) \($0.key)" }.joined(separator: "; ")
    }
    report.note(
      "  \(name): \(path)\n    traps (not relocated because): \(traps == 0 ? "none" : listed(trapped))"
        + "\n    refused: \(refused.isEmpty ? "none" : listed(refused))")
  }

  /// gzip from Debian's sources, built with `gcc -O2` only (cached), or nil with a note.
  private func gzipBuild(_ report: BenchReport) -> String? {
    let directory = cacheDirectory + "/relocate"
    let binary = directory + "/gzip-plain"
    if FileManager.default.isExecutableFile(atPath: binary) { return binary }
    let script = """
      set -e
      rm -rf source && mkdir source && cd source
      apt-get source --download-only -qq gzip >/dev/null 2>&1
      # The upstream sources as released (Debian's patches would make autotools regenerate files).
      dpkg-source -q --skip-patches -x *.dsc gzip >/dev/null 2>&1
      cd gzip
      ./configure -q CC=gcc CFLAGS=-O2 >/dev/null
      make -j2 -s >/dev/null 2>&1
      cp gzip ../../gzip-plain
      """
    do {
      try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
      let process = Process()
      process.executableURL = URL(fileURLWithPath: "/bin/sh")
      process.arguments = ["-c", script]
      process.currentDirectoryURL = URL(fileURLWithPath: directory)
      try process.run()
      process.waitUntilExit()
      guard process.terminationStatus == 0 else {
        report.note("note: gzip left out (apt-get source gzip or its build failed; a deb-src entry is needed)")
        return nil
      }
      return binary
    } catch {
      report.note("note: gzip left out: \(error)")
      return nil
    }
  }
}
