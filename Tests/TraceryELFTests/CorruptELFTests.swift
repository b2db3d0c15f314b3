import Foundation
import Testing
import TraceryTestSupport

@testable import TraceryELF

/// Corrupt and truncated inputs: each must give its typed error, never a crash.
@Suite struct CorruptELFTests {
  static let valid: [UInt8] = {
    let path = try! ELFFixtures.clangDemo()
    return Array(try! Data(contentsOf: URL(fileURLWithPath: path)))
  }()

  static func put<T: FixedWidthInteger>(_ value: T, at offset: Int, in bytes: inout [UInt8]) {
    withUnsafeBytes(of: value.littleEndian) { raw in
      for (index, byte) in raw.enumerated() { bytes[offset + index] = byte }
    }
  }

  static func sectionHeader(named name: String, in bytes: [UInt8]) -> Int {
    let file = try! ELFFile(bytes: bytes)
    let index = file.sections.first { $0.name == name }!.index
    let shoff = bytes[40..<48].reversed().reduce(0) { $0 << 8 | Int($1) }
    return shoff + index * 64
  }

  struct Case: Sendable, CustomTestStringConvertible {
    let name: String
    let mutate: @Sendable ([UInt8]) -> [UInt8]
    let expected: @Sendable (ELFError, [UInt8]) -> Bool
    /// Parse only the header (false) or also read symbols and sites (true).
    var deep = false
    var testDescription: String { name }
  }

  static let cases: [Case] = [
    Case(name: "empty", mutate: { _ in [] }, expected: { e, _ in e == .tooSmall(size: 0) }),
    Case(name: "ten bytes", mutate: { Array($0.prefix(10)) }, expected: { e, _ in e == .tooSmall(size: 10) }),
    Case(
      name: "bad magic",
      mutate: {
        var b = $0; b[1] = 0x45 ^ 0xff; return b
      }, expected: { e, _ in e == .notELF }),
    Case(
      name: "32-bit class",
      mutate: {
        var b = $0; b[4] = 1; return b
      }, expected: { e, _ in e == .not64Bit(elfClass: 1) }),
    Case(
      name: "big endian",
      mutate: {
        var b = $0; b[5] = 2; return b
      }, expected: { e, _ in e == .notLittleEndian }),
    Case(
      name: "ident version 0",
      mutate: {
        var b = $0; b[6] = 0; return b
      }, expected: { e, _ in e == .badVersion(0) }),
    Case(
      name: "i386 machine",
      mutate: {
        var b = $0; put(UInt16(3), at: 18, in: &b); return b
      },
      expected: { e, _ in e == .notX86_64(machine: 3) }),
    Case(
      name: "truncated to half", mutate: { Array($0.prefix($0.count / 2)) },
      expected: { e, _ in if case .outOfBounds = e { return true } else { return false } }),
    Case(
      name: "truncated by one byte", mutate: { Array($0.dropLast()) },
      expected: { e, _ in
        if case .outOfBounds(let what, _, _, _) = e { return what == "section header table" } else { return false }
      }),
    Case(
      name: "program header entry size",
      mutate: {
        var b = $0; put(UInt16(40), at: 54, in: &b); return b
      },
      expected: { e, _ in e == .badEntrySize(table: "program header table", size: 40, expected: 56) }),
    Case(
      name: "section header entry size",
      mutate: {
        var b = $0; put(UInt16(32), at: 58, in: &b); return b
      },
      expected: { e, _ in e == .badEntrySize(table: "section header table", size: 32, expected: 64) }),
    Case(
      name: "program headers past the end",
      mutate: {
        var b = $0; put(UInt64.max - 8, at: 32, in: &b); return b
      },
      expected: { e, _ in
        if case .outOfBounds(let what, _, _, _) = e { return what == "program header table" } else { return false }
      }),
    Case(
      name: "section headers past the end",
      mutate: {
        var b = $0; put(UInt64(b.count - 10), at: 40, in: &b); return b
      },
      expected: { e, _ in
        if case .outOfBounds(let what, _, _, _) = e { return what == "section header table" } else { return false }
      }),
    Case(
      name: "huge section count",
      mutate: {
        var b = $0; put(UInt16(0xfff0), at: 60, in: &b); return b
      },
      expected: { e, _ in if case .outOfBounds = e { return true } else { return false } }),
    Case(
      name: "section name table index",
      mutate: {
        var b = $0; put(UInt16(9999), at: 62, in: &b); return b
      },
      expected: { e, _ in
        if case .badSectionIndex(let what, 9999, _) = e { return what == "e_shstrndx" } else { return false }
      }),
    Case(
      name: "section data past the end",
      mutate: {
        var b = $0; put(UInt64(b.count), at: sectionHeader(named: ".text", in: b) + 24, in: &b); return b
      },
      expected: { e, _ in
        if case .outOfBounds(let what, _, _, _) = e { return what.hasPrefix("section ") } else { return false }
      }),
    Case(
      name: "section size overflows",
      mutate: {
        var b = $0; put(UInt64.max, at: sectionHeader(named: ".text", in: b) + 32, in: &b); return b
      },
      expected: { e, _ in if case .outOfBounds = e { return true } else { return false } }),
    Case(
      name: "section name offset",
      mutate: {
        var b = $0; put(UInt32(0x7fff_ffff), at: sectionHeader(named: ".text", in: b), in: &b); return b
      },
      expected: { e, _ in e == .badStringOffset(table: "section names", offset: 0x7fff_ffff) }),
    Case(
      name: "symtab string table link",
      mutate: {
        var b = $0; put(UInt32(5000), at: sectionHeader(named: ".symtab", in: b) + 40, in: &b); return b
      },
      expected: { e, _ in
        if case .badSectionIndex(let what, 5000, _) = e { return what == "sh_link of .symtab" } else { return false }
      },
      deep: true),
    Case(
      name: "symtab entry size",
      mutate: {
        var b = $0; put(UInt64(16), at: sectionHeader(named: ".symtab", in: b) + 56, in: &b); return b
      },
      expected: { e, _ in e == .badEntrySize(table: ".symtab", size: 16, expected: 24) }, deep: true),
    Case(
      name: "symbol name offset",
      mutate: { b in
        var b = b
        let header = sectionHeader(named: ".symtab", in: b)
        let offset = b[header + 24..<header + 32].reversed().reduce(0) { $0 << 8 | Int($1) }
        put(UInt32(0x7fff_0000), at: offset + 24, in: &b)  // symbol 1's st_name
        return b
      },
      expected: { e, _ in e == .badStringOffset(table: "string table of .symtab", offset: 0x7fff_0000) }, deep: true),
    Case(
      name: "relocation entry size",
      mutate: {
        var b = $0; put(UInt64(7), at: sectionHeader(named: ".rela.dyn", in: b) + 56, in: &b); return b
      },
      expected: { e, _ in e == .badEntrySize(table: ".rela.dyn", size: 7, expected: 24) }, deep: true),
  ]

  @Test(arguments: cases)
  func corruptInputGivesTypedError(_ test: Case) {
    let bytes = test.mutate(Self.valid)
    do {
      let file = try ELFFile(bytes: bytes)
      if test.deep { _ = try SymbolTable([SymbolTable.Input(path: "corrupt", bias: 0, file: file)]) }
      Issue.record("\(test.name): no error")
    } catch {
      #expect(test.expected(error, bytes), "\(test.name): got \(error)")
      #expect(!error.description.isEmpty)
    }
  }

  @Test func unreadablePathIsTypedError() {
    #expect(throws: ELFError.unreadable(path: "/nonexistent/tracery", errno: ENOENT)) {
      try ELFFile(path: "/nonexistent/tracery")
    }
    #expect(throws: ELFError.unreadable(path: "/tmp", errno: EISDIR)) { try ELFFile(path: "/tmp") }
  }

  /// Random byte flips over the whole reading path: any outcome but a crash is fine.
  @Test func randomMutationsNeverCrash() {
    var generator = SplitMix(seed: 0x7ace_7ace)
    let valid = Self.valid
    var errors = 0
    for _ in 0..<300 {
      var bytes = valid
      for _ in 0..<(1 + Int(generator.next() % 16)) {
        // Aim most flips at the headers, where they matter.
        let limit = generator.next() % 4 == 0 ? bytes.count : min(bytes.count, 4096)
        bytes[Int(generator.next() % UInt64(limit))] = UInt8(truncatingIfNeeded: generator.next())
      }
      if generator.next() % 5 == 0 { bytes.removeLast(Int(generator.next() % UInt64(bytes.count))) }
      do {
        let file = try ELFFile(bytes: bytes)
        _ = try SymbolTable([SymbolTable.Input(path: "mutated", bias: 0, file: file)])
        _ = try file.neededLibraries()
        _ = file.buildID()
      } catch {
        errors += 1
      }
    }
    #expect(errors > 0)
  }
}

struct SplitMix {
  var state: UInt64
  init(seed: UInt64) { state = seed }
  mutating func next() -> UInt64 {
    state &+= 0x9e37_79b9_7f4a_7c15
    var z = state
    z = (z ^ (z >> 30)) &* 0xbf58_476d_1ce4_e5b9
    z = (z ^ (z >> 27)) &* 0x94d0_49bb_1331_11eb
    return z ^ (z >> 31)
  }
}
