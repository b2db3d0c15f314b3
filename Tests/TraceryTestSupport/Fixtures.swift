import Foundation

/// Small programs and libraries built once per test run with the real compilers.
public enum ELFFixtures {
  public static let directory: URL = try! TestSupport.temporaryDirectory("tracery-elf")

  public static let demoSource = TestSupport.packageRoot.appendingPathComponent("Examples/demo/demo.c").path

  /// The demo built by `compiler` with `flags` (cached per flag set).
  public static func demo(_ name: String, compiler: String, flags: [String]) throws -> String {
    let output = directory.appendingPathComponent(name).path
    if !FileManager.default.fileExists(atPath: output) {
      // Tests run in parallel: build under a private name and rename, so no test ever sees a
      // half-written file.
      let temporary = output + ".\(UUID().uuidString)"
      try TestSupport.compile(compiler: compiler, sources: [demoSource], flags: flags, output: temporary)
      guard rename(temporary, output) == 0 else { throw TestSupport.CompileError(description: "rename \(temporary)") }
    }
    return output
  }

  /// A shared library of 8,000 functions with patch sites and a build id (~300 KiB of code):
  /// large enough to be read without its code (`ELFFile(pathWithoutCode:)`).
  public static func manyFunctionsLibrary() throws -> String {
    let output = directory.appendingPathComponent("libmany.so").path
    if !FileManager.default.fileExists(atPath: output) {
      let source = directory.appendingPathComponent("many-\(UUID().uuidString).c").path
      try TestSupport.writeGeneratedFunctions(count: 8000, prefix: "many_", to: source)
      let temporary = output + ".\(UUID().uuidString)"
      try TestSupport.compile(
        compiler: "clang", sources: [source],
        flags: ["-O2", "-fPIC", "-shared", "-fpatchable-function-entry=5", "-Wl,--build-id"], output: temporary)
      guard rename(temporary, output) == 0 else { throw TestSupport.CompileError(description: "rename \(temporary)") }
    }
    return output
  }

  public static func clangDemo() throws -> String {
    try demo("demo-clang", compiler: "clang", flags: ["-O1", "-fpatchable-function-entry=5"])
  }

  /// Linked with an explicit build-id (the default linker here, gold, adds none).
  public static func clangBuildIDDemo() throws -> String {
    try demo("demo-clang-buildid", compiler: "clang", flags: ["-O1", "-fpatchable-function-entry=5", "-Wl,--build-id"])
  }

  public static func clangLLDDemo() throws -> String {
    try demo("demo-clang-lld", compiler: "clang", flags: ["-O1", "-fpatchable-function-entry=5", "-fuse-ld=lld"])
  }

  public static func gccMcountDemo() throws -> String {
    try demo(
      "demo-gcc-mcount", compiler: "gcc",
      flags: ["-O1", "-pg", "-mfentry", "-mnop-mcount", "-mrecord-mcount", "-fno-pie", "-no-pie"])
  }

  public static func gccSledDemo() throws -> String {
    try demo("demo-gcc-sled", compiler: "gcc", flags: ["-O1", "-fpatchable-function-entry=5"])
  }

  public static func gccCETDemo() throws -> String {
    try demo("demo-gcc-cet", compiler: "gcc", flags: ["-O1", "-fpatchable-function-entry=5", "-fcf-protection=full"])
  }
}

/// What binutils says about an object: the functions (`nm`) that hold a recorded patch site
/// (`readelf -x` of the site sections, plus `readelf -r` for lld's RELATIVE-only words).
public enum Binutils {
  public struct Function: Hashable, Sendable {
    public let name: String
    public let address: UInt64
  }

  public static func functions(_ path: String) throws -> [Function] {
    let result = try TestSupport.run(TestSupport.which("nm")!, ["--defined-only", path])
    return result.stdout.split(separator: "\n").compactMap { line in
      let fields = line.split(separator: " ")
      guard fields.count == 3, "tTwW".contains(fields[1]), let address = UInt64(fields[0], radix: 16) else {
        return nil
      }
      return Function(name: String(fields[2]), address: address)
    }
  }

  /// Addresses recorded in `section` (link-time).
  public static func siteAddresses(_ path: String, section: String) throws -> [UInt64] {
    let dump = try TestSupport.run(TestSupport.which("readelf")!, ["-x", section, path]).stdout
    var words: [(UInt64, UInt64)] = []
    for line in dump.split(separator: "\n") {
      // "  0x001f0120 40021400 00000000 50021400 00000000 @.......P.......": the hex groups sit in
      // the 35 columns after the address; the ASCII column follows and must not be parsed.
      let fields = line.split(separator: " ")
      guard fields.count >= 2, fields[0].hasPrefix("0x"), let base = UInt64(fields[0].dropFirst(2), radix: 16) else {
        continue
      }
      let text = Array(line)
      guard let start = line.range(of: String(fields[0]))?.upperBound else { continue }
      let offset = line.distance(from: line.startIndex, to: start)
      let hex = String(text[min(offset, text.count)..<min(offset + 36, text.count)]).split(separator: " ").joined()
      var bytes: [UInt8] = []
      var index = hex.startIndex
      while index < hex.endIndex {
        let next = hex.index(index, offsetBy: 2)
        bytes.append(UInt8(hex[index..<next], radix: 16)!)
        index = next
      }
      for word in 0..<(bytes.count / 8) {
        let value = bytes[word * 8..<word * 8 + 8].reversed().reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
        words.append((base + UInt64(word * 8), value))
      }
    }
    // lld: the words are zero and the value is the addend of a RELATIVE relocation.
    let relocations = try TestSupport.run(TestSupport.which("readelf")!, ["-rW", path]).stdout
    var addends: [UInt64: UInt64] = [:]
    for line in relocations.split(separator: "\n") where line.contains("R_X86_64_RELATIVE") {
      let fields = line.split(separator: " ")
      if let offset = UInt64(fields[0], radix: 16), let addend = UInt64(fields.last!, radix: 16) {
        addends[offset] = addend
      }
    }
    return words.map { addends[$0.0] ?? $0.1 }.filter { $0 != 0 }
  }

  /// Names of the functions whose bytes hold a site recorded in `section`.
  public static func functionsWithSites(_ path: String, section: String) throws -> Set<String> {
    let functions = try self.functions(path).sorted { $0.address < $1.address }
    var names: Set<String> = []
    for site in try siteAddresses(path, section: section) {
      // The last function starting at or before the site (sites are at the entry or after endbr64).
      if let function = functions.last(where: { $0.address <= site }), site - function.address <= 4 {
        names.insert(function.name)
      }
    }
    return names
  }
}
