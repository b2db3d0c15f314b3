import Foundation
import Testing
import TraceryTestSupport

/// `tracery list`, run as a user runs it, against what binutils says about the same binaries.
@Suite struct ListCommandTests {
  static let tracery = TestSupport.productsDirectory.appendingPathComponent("tracery").path

  struct Row: Hashable, CustomStringConvertible {
    let site: UInt64
    let name: String
    var description: String { "\(name)@0x\(String(site, radix: 16))" }
  }

  /// The rows of `tracery list` output: "  0xSITE  KIND  SECTION  NAME".
  static func rows(_ output: String) -> [(row: Row, kind: String, section: String)] {
    output.split(separator: "\n").compactMap { line in
      let fields = line.split(separator: " ", omittingEmptySubsequences: true)
      guard fields.count == 4, fields[0].hasPrefix("0x"), let site = UInt64(fields[0].dropFirst(2), radix: 16) else {
        return nil
      }
      return (Row(site: site, name: String(fields[3])), String(fields[1]), String(fields[2]))
    }
  }

  /// What nm, readelf and objdump say: each recorded site, the function holding it, and that
  /// objdump decodes NOPs there.
  static func binutilsRows(_ path: String, section: String) throws -> Set<Row> {
    let functions = try Binutils.functions(path).sorted { $0.address < $1.address }
    let disassembly = try TestSupport.run(TestSupport.which("objdump")!, ["-d", "--no-show-raw-insn", path]).stdout
    var instructions: [UInt64: String] = [:]
    for line in disassembly.split(separator: "\n") {
      let parts = line.split(separator: ":", maxSplits: 1)
      guard parts.count == 2, let address = UInt64(parts[0].trimmingCharacters(in: .whitespaces), radix: 16) else {
        continue
      }
      instructions[address] = parts[1].trimmingCharacters(in: .whitespaces)
    }
    var rows: Set<Row> = []
    for site in try Binutils.siteAddresses(path, section: section) {
      guard let function = functions.last(where: { $0.address <= site }), site - function.address <= 4 else { continue }
      #expect(
        instructions[site]?.hasPrefix("nop") == true,
        "objdump at 0x\(String(site, radix: 16)): \(instructions[site] ?? "nothing")")
      rows.insert(Row(site: site, name: function.name))
    }
    return rows
  }

  @Test(arguments: [
    ("clang -fpatchable-function-entry=5", "__patchable_function_entries", "nop5"),
    ("gcc -pg -mfentry -mnop-mcount -mrecord-mcount", "__mcount_loc", "nop5"),
    ("gcc -fpatchable-function-entry=5", "__patchable_function_entries", "nop-sled"),
  ])
  func listsExactlyTheFunctionsBinutilsShows(build: String, section: String, kind: String) throws {
    let path: String
    switch build {
    case let text where text.hasPrefix("clang"): path = try ELFFixtures.clangDemo()
    case let text where text.contains("mcount"): path = try ELFFixtures.gccMcountDemo()
    default: path = try ELFFixtures.gccSledDemo()
    }
    let result = try TestSupport.run(Self.tracery, ["list", path])
    #expect(result.status == 0, "\(result.stderr)")
    let rows = Self.rows(result.stdout)
    let expected = try Self.binutilsRows(path, section: section)
    #expect(expected.count >= 6)
    #expect(Set(rows.map(\.row)) == expected)
    #expect(rows.count == expected.count, "a function listed twice")
    #expect(rows.allSatisfy { $0.kind == kind && $0.section == section }, "\(rows.map { ($0.kind, $0.section) })")
    #expect(result.stdout.contains("no patch sites in libc.so.6"))
  }

  /// `--relocate` lists the program's functions without a site as `record --relocate` would
  /// trace them: gcc -O2's tails.c has none with a site; all are relocated, its 2-byte `worker`
  /// (a tail `jmp`, then padding) whole.
  @Test func relocateListsHowEachFunctionWouldBeTraced() throws {
    let directory = try TestSupport.temporaryDirectory("list-relocate")
    defer { try? FileManager.default.removeItem(at: directory) }
    let program = try RecordCommandTests.program("tails", flags: ["-O2", "-pthread"], in: directory)
    let plain = try TestSupport.run(Self.tracery, ["list", program])
    #expect(plain.status != 0 && plain.stderr.contains("no patch sites"))
    let listed = try TestSupport.run(Self.tracery, ["list", "--relocate", program])
    #expect(listed.status == 0, "\(listed.stderr)")
    let rows = Dictionary(
      listed.stdout.split(separator: "\n").compactMap { line -> (String, String)? in
        let fields = line.split(separator: " ")
        guard fields.count >= 3, fields[0].hasPrefix("0x") else { return nil }
        return (String(fields.last!), String(fields[1]))
      }
    ) { first, _ in first }
    for name in ["main", "worker", "leaf", "mid", "top", "even", "odd", "jumper", "jump_mid"] {
      #expect(rows[name] == "moved", "\(name): \(listed.stdout)")
    }
  }

  @Test func matchFiltersByGlob() throws {
    let path = try ELFFixtures.clangDemo()
    let result = try TestSupport.run(Self.tracery, ["list", "--match", "[fr][ie]*", path])
    #expect(result.status == 0)
    #expect(Set(Self.rows(result.stdout).map(\.row.name)) == ["fib", "report"])
  }

  @Test func bundledDemoHasSites() throws {
    let demo = TestSupport.productsDirectory.appendingPathComponent("demo").path
    let result = try TestSupport.run(Self.tracery, ["list", demo])
    #expect(result.status == 0)
    #expect(Set(Self.rows(result.stdout).map(\.row.name)).isSuperset(of: ["fib", "square", "distance2", "main"]))
  }

  struct BadInput: Sendable, CustomTestStringConvertible {
    let name: String
    let arguments: @Sendable () throws -> [String]
    let status: Int32
    let message: String
    var testDescription: String { name }
  }

  static let badInputs: [BadInput] = [
    BadInput(
      name: "program not found", arguments: { ["list", "/nonexistent/program"] }, status: 1,
      message: "tracery: program not found: /nonexistent/program\n"),
    BadInput(
      name: "name not in PATH", arguments: { ["list", "no-such-tracery-program"] }, status: 1,
      message: "tracery: program not found: no-such-tracery-program (not a path, and not in PATH)\n"),
    BadInput(
      name: "no patch sites", arguments: { ["list", "/bin/true"] }, status: 1,
      message: "tracery: /bin/true has no patch sites"),
    BadInput(
      name: "not an ELF file",
      arguments: {
        let path = try TestSupport.temporaryDirectory().appendingPathComponent("script.sh").path
        try "#!/bin/sh\necho hi\n".write(toFile: path, atomically: true, encoding: .utf8)
        return ["list", path]
      }, status: 1, message: "not an ELF file (bad magic)\n"),
    BadInput(
      name: "truncated ELF file",
      arguments: {
        let bytes = try Data(contentsOf: URL(fileURLWithPath: ELFFixtures.clangDemo()))
        let path = try TestSupport.temporaryDirectory().appendingPathComponent("truncated").path
        try bytes.prefix(bytes.count / 2).write(to: URL(fileURLWithPath: path))
        return ["list", path]
      }, status: 1, message: "corrupt or truncated ELF"),
    BadInput(
      name: "glob matches nothing", arguments: { ["list", "--match", "zz*", try ELFFixtures.clangDemo()] },
      status: 1, message: "tracery: no patchable function matches 'zz*'"),
    BadInput(
      name: "malformed glob", arguments: { ["list", "--match", "a[b", try ELFFixtures.clangDemo()] },
      status: 64, message: "invalid --match pattern: glob 'a[b': '[' without a closing ']'"),
    BadInput(
      name: "unknown option", arguments: { ["list", "--frobnicate", "x"] }, status: 64,
      message: "Unknown option '--frobnicate'"),
    BadInput(
      name: "unknown bench suite", arguments: { ["bench", "nosuch"] }, status: 64,
      message: "The value 'nosuch' is invalid for '<suite>'"),
  ]

  @Test(arguments: badInputs)
  func badInputGivesOneClearLineAndStatus(_ input: BadInput) throws {
    let result = try TestSupport.run(Self.tracery, try input.arguments())
    #expect(result.status == input.status, "\(input.name): status \(result.status), stderr \(result.stderr)")
    #expect(result.stderr.contains(input.message), "\(input.name): stderr was \(result.stderr)")
    #expect(result.stdout.isEmpty)
  }
}
