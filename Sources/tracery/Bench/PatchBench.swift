import Foundation
import TraceryCore
import TraceryELF
import TraceryX86

/// `tracery bench patch`: the cost of finding and rewriting many live sites, and of attaching
/// a handler to all of them through `Tracer`.
///
/// A generated shared object of 50,000 functions (built once with clang and cached) is loaded
/// into this process; every function gets a counting trampoline; each run patches the first N
/// sites in one batch and unpatches them in another.
struct PatchBench {
  static let functionCount = 50_000
  static let sizes = [1_000, 10_000, 50_000]
  let runs: Int
  let cacheDirectory: String

  func run(_ report: BenchReport) throws {
    let library = try GeneratedLibrary.path(functions: Self.functionCount, directory: cacheDirectory, report: report)

    // The symbol table of the 50,000-function object, from reading the file to lookups ready.
    var table: SymbolTable?
    let tableTime = try medianNanoseconds(runs: runs) {
      table = try SymbolTable([SymbolTable.Input(path: library, bias: 0, file: try ELFFile(path: library))])
    }
    guard let table else { return }
    report.figure(name: "symbol-table", n: table.functions.count, nsPerItem: tableTime / Double(table.functions.count))
    let glob = try Glob("tr_f*7")
    var matched = 0
    let globTime = medianNanoseconds(runs: runs) { matched = table.functions(matching: glob).count }
    guard matched == Self.functionCount / 10 else {
      throw UserError("glob matched \(matched), expected \(Self.functionCount / 10)")
    }
    report.figure(name: "glob", n: table.functions.count, nsPerItem: globTime / Double(table.functions.count))

    // Load it and find its live sites.
    let handle = try GeneratedLibrary.load(library)
    defer { dlclose(handle) }
    let resolved = URL(fileURLWithPath: library).resolvingSymlinksInPath().path
    guard let loaded = ProcessObjects.list().first(where: { $0.path == library || $0.path == resolved }) else {
      throw UserError("\(library) is loaded but not listed by dl_iterate_phdr")
    }
    let live = try SymbolTable([SymbolTable.Input(path: library, bias: loaded.bias, file: try ELFFile(path: library))])
    let sites = (0..<Self.functionCount).map { index -> UInt64 in
      let function = live.functions[live.functions(named: "tr_f\(index)")[0]]
      return function.site!
    }
    let original = TextPatcher.read(sites[0])
    let probes = try CountingTrampolines(sites: sites, mode: .call)
    let patcher = TextPatcher.shared
    if !patcher.usesMembarrier {
      report.note("note: membarrier SYNC_CORE unavailable; using the TLB-shootdown fallback")
    }
    for size in Self.sizes {
      let patch = (0..<size).map { PatchRequest(site: sites[$0], expected: original, replacement: probes.branch($0)) }
      let unpatch = (0..<size).map { PatchRequest(site: sites[$0], expected: probes.branch($0), replacement: original) }
      var patchSamples: [Double] = []
      var unpatchSamples: [Double] = []
      for _ in 0..<runs {
        patchSamples.append(try time { try Self.expectAllPatched(patcher.apply(patch)) })
        unpatchSamples.append(try time { try Self.expectAllPatched(patcher.apply(unpatch)) })
      }
      report.figure(name: "patch", n: size, nsPerItem: median(patchSamples) / Double(size))
      report.figure(name: "unpatch", n: size, nsPerItem: median(unpatchSamples) / Double(size))
    }
    try attachEvery(report, prefix: "tr_f", shape: .nop, name: "attach", detachName: "detach")
    if report.wants("attach-multi") || report.wants("detach-multi") {
      try attachMultiEvery(report, handle: handle, prefix: "tr_f", shape: .nop, name: "multi")
    }
    guard
      ["attach-relocated", "detach-relocated", "attach-multi-relocated", "detach-multi-relocated"].contains(
        where: report.wants)
    else { return }
    // 50,000 functions built without NOPs (another generated object, `tr_p*`), each traced
    // through its relocated prologue (this process has one thread).
    let plain = try GeneratedLibrary.path(
      functions: Self.functionCount, directory: cacheDirectory, report: report, sites: .none)
    let plainHandle = try GeneratedLibrary.load(plain)
    defer { dlclose(plainHandle) }
    Tracer.shared.relocatesPrologues = true
    defer { Tracer.shared.relocatesPrologues = false }
    if report.wants("attach-relocated") || report.wants("detach-relocated") {
      try attachEvery(
        report, prefix: "tr_p", shape: .relocated, name: "attach-relocated", detachName: "detach-relocated")
    }
    try attachMultiEvery(report, handle: plainHandle, prefix: "tr_p", shape: .relocated, name: "multi-relocated")
  }

  /// `attach-multi`/`detach-multi` (`-relocated`): the 50,000 functions named `prefix*`, one
  /// entry handler through the multi-attach global strategy, by one glob (a bulk link: the
  /// records found by hash; relocated, each function's first instructions moved into its
  /// prologue stub). The NOP-site figure is the relocated one's floor: the same resolve, link and
  /// patch batch, without deciding, moving and stubbing prologues. Each run then calls every
  /// function once through the object's table: the handler must have counted 50,000 calls and
  /// every function returned what it does untraced.
  func attachMultiEvery(
    _ report: BenchReport, handle: UnsafeMutableRawPointer, prefix: String, shape: PatchSite.Shape, name: String
  ) throws {
    let tracer = Tracer.shared
    let symbol = prefix == "tr_f" ? "tr_table" : "tr_ptable"
    let table = dlsym(handle, symbol)!.assumingMemoryBound(to: (@convention(c) (Int) -> Int).self)
    let model = FunctionModel(integerArguments: 1)
    let count = Self.functionCount
    let expected = (0..<count).map { table[$0](7) }
    let counter = UnsafeMutablePointer<UInt64>.allocate(capacity: 1)
    defer { counter.deallocate() }
    tracer.reloadSymbols()
    // Loads the symbol table of the whole process once, outside the timing.
    try tracer.attachMulti(
      TriggerBench.countingHandlers[.entry]!, to: .name("\(prefix)0"), cookie: { _ in 0 }, model: model,
      strategy: .global(.hash)
    ).detach()
    var attachSamples: [Double] = []
    var detachSamples: [Double] = []
    for _ in 0..<max(1, runs) {
      var link: MultiLink?
      counter.pointee = 0
      let cookie = UInt64(UInt(bitPattern: counter))
      attachSamples.append(
        try time {
          link = try tracer.attachMulti(
            TriggerBench.countingHandlers[.entry]!, to: .glob("\(prefix)*"), cookie: { _ in cookie }, model: model,
            strategy: .global(.hash))
        })
      // Every function in the bulk link (none traced outside it), its site calling the global
      // trampoline (a NOP site) or jumping to its prologue stub (relocated).
      let opcode: UInt8 = shape == .nop ? 0xe8 : 0xe9
      guard let link, link.sites.count == count, tracer.siteShapes.isEmpty,
        link.sites.allSatisfy({ UnsafePointer<UInt8>(bitPattern: UInt($0))!.pointee == opcode })
      else {
        throw UserError(
          "multi-attached to \(link?.sites.count ?? 0) functions (\(tracer.siteShapes) outside the bulk link), "
            + "expected \(count) \(shape) sites in it")
      }
      let wrong = (0..<count).filter { table[$0](7) != expected[$0] }.count
      guard wrong == 0, counter.pointee == UInt64(count) else {
        throw UserError("through the bulk link: \(wrong) wrong results, \(counter.pointee) handler calls of \(count)")
      }
      detachSamples.append(time { _ = link.detach() })
      tracer.reclaim()
    }
    report.figure(name: "attach-\(name)", n: count, nsPerItem: median(attachSamples) / Double(count))
    report.figure(name: "detach-\(name)", n: count, nsPerItem: median(detachSamples) / Double(count))
  }

  /// `attach`/`detach` (and `-relocated`): one entry handler attached to every generated function
  /// named `prefix*` by one glob, and detached, through `Tracer`: resolve, (relocate,) generate
  /// 50,000 trampolines, one patch batch (and back); every function must get a site of `shape`.
  func attachEvery(
    _ report: BenchReport, prefix: String, shape: PatchSite.Shape, name: String, detachName: String
  ) throws {
    let tracer = Tracer.shared
    tracer.reloadSymbols()
    let empty: EntryHandler = { _, _ in }
    let model = FunctionModel(integerArguments: 1)
    // Loads the symbol table of the whole process once, outside the timing.
    try tracer.attach(.entry(empty), to: .name("\(prefix)0"), model: model).detach()
    var attachSamples: [Double] = []
    var detachSamples: [Double] = []
    for _ in 0..<max(1, min(runs, 3)) {
      var link: Link?
      attachSamples.append(try time { link = try tracer.attach(.entry(empty), to: .glob("\(prefix)*"), model: model) })
      let shaped = tracer.siteShapes[shape] ?? 0
      guard let link, link.functions.count == Self.functionCount, shaped == Self.functionCount else {
        throw UserError(
          "attached to \(link?.functions.count ?? 0) functions (\(shaped) with a \(shape) site), "
            + "expected \(Self.functionCount)")
      }
      detachSamples.append(time { _ = link.detach() })
      tracer.reclaim()
    }
    report.figure(name: name, n: Self.functionCount, nsPerItem: median(attachSamples) / Double(Self.functionCount))
    report.figure(
      name: detachName, n: Self.functionCount, nsPerItem: median(detachSamples) / Double(Self.functionCount))
  }

  static func expectAllPatched(_ outcomes: [PatchOutcome]) throws {
    if let bad = outcomes.first(where: { $0 != .patched }) { throw UserError("benchmark batch did not apply: \(bad)") }
  }

  func time(_ body: () throws -> Void) rethrows -> Double {
    try medianNanoseconds(runs: 1, body)
  }
}

/// Generated C programs for benchmarks, built once with clang and cached by content.
enum GeneratedLibrary {
  enum Sites: String {
    /// A 5-byte NOP at each entry.
    case nop = ""
    /// 8 bytes of NOPs before each entry (for multi-attach records) and a 5-byte NOP at it.
    case padded = "-padded"
    /// None: built as programs ship (traced by relocating their prologues).
    case none = "-plain"
  }

  static func path(functions: Int, directory: String, report: BenchReport, sites: Sites = .nop) throws -> String {
    let version = 1
    let path = "\(directory)/functions-\(functions)\(sites.rawValue)-v\(version).so"
    if FileManager.default.fileExists(atPath: path) { return path }
    try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
    report.note("building \(path) with clang (\(functions) functions; once, then cached)…")
    var source = "typedef long (*tr_fn)(long);\n"
    source.reserveCapacity(functions * 64)
    // (Functions without NOPs are named tr_p*, so that both objects can be loaded at once.)
    let prefix = sites == .none ? "tr_p" : "tr_f"
    for index in 0..<functions {
      source += "long \(prefix)\(index)(long x) { return x * \(index % 97 + 3) + \(index); }\n"
    }
    source +=
      "tr_fn \(prefix == "tr_f" ? "tr_table" : "tr_ptable")[\(functions)] = {"
      + (0..<functions).map { "\(prefix)\($0)" }.joined(separator: ",") + "};\n"
    let sourcePath = path + ".c"
    try source.write(toFile: sourcePath, atomically: true, encoding: .utf8)
    let temporary = path + ".tmp"
    try clang(
      [
        "-O1", "-shared", "-fPIC", sourcePath, "-o", temporary,
      ]
        + (sites == .padded
          ? ["-fpatchable-function-entry=13,8"] : sites == .nop ? ["-fpatchable-function-entry=5"] : []),
      building: sourcePath)
    try FileManager.default.moveItem(atPath: temporary, toPath: path)
    try? FileManager.default.removeItem(atPath: sourcePath)
    return path
  }

  /// Loads the generated object at `path` into this process; the caller closes it.
  static func load(_ path: String) throws -> UnsafeMutableRawPointer {
    guard let handle = dlopen(path, RTLD_NOW | RTLD_LOCAL) else {
      throw UserError("cannot load \(path): \(String(cString: dlerror()))")
    }
    return handle
  }

  /// `source` (C) written to `directory/name.c` and built by clang with `flags` into
  /// `directory/name`; returns the program's path.
  static func program(_ source: String, named name: String, in directory: String, flags: [String]) throws -> String {
    try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
    let sourcePath = "\(directory)/\(name).c"
    let program = "\(directory)/\(name)"
    try source.write(toFile: sourcePath, atomically: true, encoding: .utf8)
    try clang([sourcePath, "-o", program] + flags, building: sourcePath)
    return program
  }

  /// Runs clang (found on PATH) with `arguments`.
  static func clang(_ arguments: [String], building source: String) throws {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
    process.arguments = ["clang"] + arguments
    try process.run()
    process.waitUntilExit()
    guard process.terminationStatus == 0 else { throw UserError("clang failed to build \(source)") }
  }
}
