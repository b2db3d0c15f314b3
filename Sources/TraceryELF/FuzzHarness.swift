#if canImport(Glibc)
  import Glibc
#endif

/// What the ELF fuzz target (Fuzz/ELF.swift, run by scripts/fuzz.sh) does with one input, here so
/// that the regression tests feed the inputs that once crashed (Fuzz/Regressions/elf) through
/// the same path: everything the reader derives from a file's bytes (header, segments,
/// sections, symbols, patch-site records, DT_NEEDED, build-id, call frames and landing pads, the
/// symbol table), and the
/// headers-only section-name reader through a file. It must return; a trap is the bug.
enum FuzzHarness {
  /// Returns whether the bytes were accepted as an ELF file.
  @discardableResult
  static func elf(_ bytes: [UInt8], directory: String = "/dev/shm") -> Bool {
    let file = try? ELFFile(bytes: bytes)
    if let file {
      for section in file.sections {
        _ = file.contents(of: section)
        _ = try? file.symbols(in: section)
      }
      _ = try? file.functionSymbols()
      _ = try? file.patchSiteRecords()
      _ = try? file.neededLibraries()
      _ = file.buildID()
      _ = file.relativeAddends()
      _ = try? file.importSlots()
      for description in file.frameDescriptions().descriptions.prefix(256) {
        if let lsda = description.lsda { _ = file.landingPads(lsda: lsda, functionStart: description.start) }
      }
      if let table = try? SymbolTable([SymbolTable.Input(path: "fuzz", bias: 0x1000, file: file)]) {
        for function in table.functions.prefix(64) {
          _ = table.function(containing: function.address)
          _ = table.functions(named: function.name)
        }
        _ = table.patchableFunctions
      }
    }
    let path = "\(directory)/tracery-fuzz-elf-\(getpid())"
    let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
    if fd >= 0 {
      _ = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
      close(fd)
      _ = ELFFile.sectionNames(path: path)
      unlink(path)
    }
    return file != nil
  }
}
