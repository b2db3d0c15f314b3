/// Why an ELF object could not be read. Every malformed or truncated input maps to one of these;
/// none of them is ever a crash or an out-of-bounds read.
public enum ELFError: Error, Equatable, Sendable, CustomStringConvertible {
  /// The file could not be opened or read (`errno` from the failing call).
  case unreadable(path: String, errno: Int32)
  /// Fewer bytes than an ELF header needs.
  case tooSmall(size: Int)
  /// The first four bytes are not `\x7fELF`.
  case notELF
  /// `EI_CLASS` is not `ELFCLASS64`.
  case not64Bit(elfClass: UInt8)
  /// `EI_DATA` is not `ELFDATA2LSB`.
  case notLittleEndian
  /// `EI_VERSION` or `e_version` is not `EV_CURRENT`.
  case badVersion(UInt32)
  /// `e_machine` is not `EM_X86_64` (62).
  case notX86_64(machine: UInt16)
  /// A header's entry size is not the one ELF64 defines.
  case badEntrySize(table: String, size: Int, expected: Int)
  /// A table or section claims bytes past the end of the file.
  case outOfBounds(what: String, offset: UInt64, size: UInt64, fileSize: Int)
  /// A section index that names no section (`e_shstrndx`, `sh_link`).
  case badSectionIndex(what: String, index: Int, count: Int)
  /// A string-table offset past the end of its table.
  case badStringOffset(table: String, offset: UInt64)

  public var description: String {
    switch self {
    case .unreadable(let path, let errno): return "cannot read \(path): \(String(cString: strerrorText(errno)))"
    case .tooSmall(let size): return "not an ELF file: only \(size) bytes"
    case .notELF: return "not an ELF file (bad magic)"
    case .not64Bit(let elfClass): return "not a 64-bit ELF object (EI_CLASS \(elfClass))"
    case .notLittleEndian: return "not a little-endian ELF object"
    case .badVersion(let version): return "unsupported ELF version \(version)"
    case .notX86_64(let machine): return "not an x86-64 object (e_machine \(machine))"
    case .badEntrySize(let table, let size, let expected):
      return "corrupt ELF: \(table) entries are \(size) bytes, expected \(expected)"
    case .outOfBounds(let what, let offset, let size, let fileSize):
      return "corrupt or truncated ELF: \(what) at offset \(offset) size \(size) exceeds file size \(fileSize)"
    case .badSectionIndex(let what, let index, let count):
      return "corrupt ELF: \(what) names section \(index) of \(count)"
    case .badStringOffset(let table, let offset): return "corrupt ELF: offset \(offset) past the end of \(table)"
    }
  }
}

#if canImport(Glibc)
  import Glibc
  private func strerrorText(_ code: Int32) -> UnsafeMutablePointer<CChar> { strerror(code) }
#endif
