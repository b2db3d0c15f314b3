import Foundation
import Testing
import TraceryTestSupport

@testable import TraceryELF

@Suite struct ELFFileTests {
  @Test(arguments: [
    ("clang", "__patchable_function_entries"), ("clang-lld", "__patchable_function_entries"),
    ("gcc-mcount", "__mcount_loc"), ("gcc-sled", "__patchable_function_entries"),
    ("gcc-cet", "__patchable_function_entries"),
  ])
  func siteRecordsMatchBinutils(variant: String, section: String) throws {
    let path: String
    switch variant {
    case "clang": path = try ELFFixtures.clangDemo()
    case "clang-lld": path = try ELFFixtures.clangLLDDemo()
    case "gcc-mcount": path = try ELFFixtures.gccMcountDemo()
    case "gcc-sled": path = try ELFFixtures.gccSledDemo()
    default: path = try ELFFixtures.gccCETDemo()
    }
    let file = try ELFFile(path: path)
    let records = try file.patchSiteRecords()
    let expected = try Binutils.siteAddresses(path, section: section).sorted()
    #expect(!expected.isEmpty)
    #expect(records.map(\.address) == expected)
    #expect(Set(records.map(\.source)) == [section == "__mcount_loc" ? .mcountLoc : .patchableFunctionEntries])
    let table = try SymbolTable([SymbolTable.Input(path: path, bias: 0, file: file)])
    let named = Set(table.patchableFunctions.map { table.functions[$0].name })
    #expect(named == (try Binutils.functionsWithSites(path, section: section)))
    #expect(named.isSuperset(of: ["fib", "report", "main"]))
    #expect(table.orphanSites.isEmpty)
  }

  @Test func cetSitesFollowEndbr64() throws {
    let path = try ELFFixtures.gccCETDemo()
    let file = try ELFFile(path: path)
    let table = try SymbolTable([SymbolTable.Input(path: path, bias: 0, file: file)])
    let fib = table.functions[try #require(table.functions(named: "fib").first)]
    let site = try #require(fib.site)
    let entryBytes = file.bytes(atAddress: fib.address, count: 4)
    let siteBytes = file.bytes(atAddress: site, count: 5)
    #expect(entryBytes == [0xf3, 0x0f, 0x1e, 0xfa])
    #expect(site == fib.address + 4)
    #expect(siteBytes == [0x90, 0x90, 0x90, 0x90, 0x90])
  }

  @Test func symbolsBuildIDAndDynamicInfo() throws {
    let path = try ELFFixtures.clangBuildIDDemo()
    let file = try ELFFile(path: path)
    let type = file.type
    #expect(type == .sharedObject || type == .executable)
    #expect(try file.neededLibraries().contains("libc.so.6"))
    let readelf = try TestSupport.run(TestSupport.which("readelf")!, ["-n", path]).stdout
    let id = try #require(file.buildID())
    let hex = id.map { String(format: "%02x", $0) }.joined()
    #expect(readelf.contains("Build ID: \(hex)"))
    // readelf, not nm: nm's "W" does not say whether a weak symbol is a function.
    let readelfSymbols = try TestSupport.run(TestSupport.which("readelf")!, ["-sW", path]).stdout
    let readelfFunctions = Set(
      readelfSymbols.split(separator: "\n").compactMap { line -> String? in
        let fields = line.split(separator: " ")
        guard fields.count == 8, fields[3] == "FUNC", fields[6] != "UND" else { return nil }
        return String(fields[7])
      })
    let ours = Set(try file.functionSymbols().map(\.name))
    #expect(!ours.isEmpty)
    #expect(ours == readelfFunctions)
  }

  @Test func symbolTableLookups() throws {
    let path = try ELFFixtures.clangDemo()
    let bias: UInt64 = 0x5555_0000_0000
    let table = try SymbolTable([SymbolTable.Input(path: path, bias: bias, file: try ELFFile(path: path))])
    let fibIndex = try #require(table.functions(named: "fib").first)
    let fib = table.functions[fibIndex]
    #expect(fib.address > bias)
    #expect(table.function(containing: fib.address) == fibIndex)
    #expect(table.function(containing: fib.address + fib.size - 1) == fibIndex)
    #expect(table.function(containing: bias) == nil)
    #expect(table.functions(named: "no_such_function").isEmpty)
    let glob = try Glob("*ib")
    #expect(table.functions(matching: glob).map { table.functions[$0].name }.contains("fib"))
    #expect(table.functions(matching: try Glob("fib")) == [fibIndex])
    let parse = table.functions(matching: try Glob("parse_[a-z]*")).map { table.functions[$0].name }
    #expect(parse == ["parse_number"])
    // The table's prefilter (each name's first 8 bytes) agrees with matching every name.
    for pattern in ["p*", "parse_*", "parse_nu*", "parse_number*", "*ib", "f?b", "m*n", "[a-f]*", "_*", "zz*", "?*"] {
      let glob = try Glob(pattern)
      let every = table.functions.indices.filter { glob.matches(table.functions[$0].name) }
      #expect(table.functions(matching: glob) == every, "\(pattern)")
      #expect(pattern == "zz*" || !every.isEmpty, "\(pattern)")
    }
  }
}

@Suite struct GlobTests {
  @Test(arguments: [
    ("parse_*", "parse_number", true), ("parse_*", "parse_", true), ("parse_*", "parsed", false),
    ("*", "", true), ("*", "anything", true), ("?", "a", true), ("?", "", false), ("?", "ab", false),
    ("a*b*c", "aXbYc", true), ("a*b*c", "aXbY", false), ("*a*a*a", "aaaa", true), ("[abc]x", "bx", true),
    ("[abc]x", "dx", false), ("[a-c]*", "cat", true), ("[!a-c]*", "cat", false), ("[^a-c]*", "dog", true),
    ("\\*", "*", true), ("\\*", "a", false), ("[]]", "]", true), ("f[-]g", "f-g", true), ("*_[0-9]", "x_7", true),
    ("tr_f1*", "tr_f10", true), ("tr_f1*", "tr_f2", false), ("*.cold", "foo.cold", true),
    ("*.cold", ".col", false), ("ab*ba", "aba", false), ("ab*ba", "abba", true), ("a?a", "a", false),
    ("a?a", "aba", true), ("x*[0-9]y", "x7y", true), ("x*[0-9]y", "xy", false), ("ab", "abc", false),
    ("ab", "ab", true), ("a*", "b", false), ("*b", "ab", true), ("*b", "ba", false),
  ])
  func matches(pattern: String, name: String, expected: Bool) throws {
    #expect(try Glob(pattern).matches(name) == expected, "\(pattern) ~ \(name)")
  }

  @Test func rejectsMalformedPatterns() {
    #expect(throws: Glob.ParseError.unterminatedClass(pattern: "a[bc")) { try Glob("a[bc") }
    #expect(throws: Glob.ParseError.trailingBackslash(pattern: "ab\\")) { try Glob("ab\\") }
    #expect(throws: Glob.ParseError.empty) { try Glob("") }
  }

  @Test func literalPatternsAreLookups() throws {
    #expect(try Glob("main").literal == "main")
    #expect(try Glob("ma\\*in").literal == "ma*in")
    #expect(try Glob("ma*").literal == nil)
  }
}

extension ELFFileTests {
  /// What the agent asks of every loaded object before reading it whole: its section names, from
  /// the headers alone, agree with the full reader's.
  /// Read without its code (`init(pathWithoutCode:)`), an object gives the same symbols, patch
  /// sites, build id and section table; its code sections have no file bytes, nor do its
  /// segments. The C library (dynamic symbols only), and a library of 8,000 functions with
  /// patch sites (a symbol table, and relocations that give the sites' addresses).
  @Test(arguments: ["libc", "many"])
  func anObjectReadWithoutItsCode(name: String) throws {
    let path = name == "libc" ? "/lib/x86_64-linux-gnu/libc.so.6" : try ELFFixtures.manyFunctionsLibrary()
    let full = try ELFFile(path: path)
    let compact = try ELFFile(pathWithoutCode: path)
    // Code and the program's data (`.rodata*`, `.data*`) are left out.
    let left = full.sections.filter {
      $0.hasFileBytes
        && ($0.flags & ELFConstants.SHF_EXECINSTR != 0 || $0.name.hasPrefix(".rodata") || $0.name.hasPrefix(".data"))
    }
    let code = left.reduce(0) { $0 + Int($1.size) }
    #expect(code > 1 << 16)
    #expect(try #require(ELFFile.readFileWithoutCode(path)).count <= full.bytes.count - code + (1 << 16))
    for section in left { #expect(compact.section(named: section.name)?.hasFileBytes == false, "\(section.name)") }
    #expect(try compact.functionSymbols() == full.functionSymbols())
    #expect(try compact.patchSiteRecords() == full.patchSiteRecords())
    #expect(compact.buildID() != nil && compact.buildID() == full.buildID())
    #expect(compact.sections.map(\.name) == full.sections.map(\.name))
    let text = try #require(compact.section(named: ".text"))
    #expect(!text.hasFileBytes && compact.contents(of: text).isEmpty)
    #expect(compact.bytes(atAddress: text.address, count: 16) == nil)
    #expect(full.bytes(atAddress: text.address, count: 16) != nil)
    if name == "many" { #expect(try compact.patchSiteRecords().count == 8000) }
    // A small file is read whole.
    #expect(ELFFile.readFileWithoutCode(try ELFFixtures.clangDemo()) == nil)
  }

  @Test func sectionNamesFromTheHeadersAlone() throws {
    let demo = try ELFFixtures.clangDemo()
    let names = try #require(ELFFile.sectionNames(path: demo))
    #expect(names == Set(try ELFFile(path: demo).sections.map(\.name)))
    #expect(ELFFile.recordsPatchSites(path: demo) == true)
    #expect(ELFFile.recordsPatchSites(path: try ELFFixtures.gccMcountDemo()) == true)
    #expect(ELFFile.recordsPatchSites(path: "/bin/sh") == false)
    #expect(ELFFile.recordsPatchSites(path: "/no/such/file") == nil)
    #expect(ELFFile.recordsPatchSites(path: "/etc/hostname") == nil)
  }
}
