#if canImport(Glibc)
  import Glibc
#endif

/// Finds the shared objects a program needs, the way the dynamic loader would, without running
/// anything: DT_RPATH (when there is no DT_RUNPATH), LD_LIBRARY_PATH, DT_RUNPATH, the
/// directories of /etc/ld.so.conf, then the system defaults. `$ORIGIN` is expanded. (The loader's
/// ld.so.cache is not read; its directories are the ld.so.conf ones.)
public struct LibraryResolver: Sendable {
  public struct Library: Sendable, Equatable {
    /// The `DT_NEEDED` name.
    public let name: String
    /// Where it was found, or nil.
    public let path: String?
  }

  let libraryPath: [String]
  let systemDirectories: [String]

  public init(environment: [String: String]) {
    libraryPath = (environment["LD_LIBRARY_PATH"] ?? "").split(separator: ":").map(String.init)
    systemDirectories =
      Self.configuredDirectories() + [
        "/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib",
      ]
  }

  /// Every library `program` needs, directly or not, breadth first, each once.
  public func dependencies(of program: String, file: ELFFile) -> [Library] {
    var result: [Library] = []
    var seen: Set<String> = []
    var queue: [(path: String, file: ELFFile)] = [(program, file)]
    let programRPath = (try? file.dynamicRPath()) ?? []
    while !queue.isEmpty {
      let (path, object) = queue.removeFirst()
      for name in (try? object.neededLibraries()) ?? [] where seen.insert(name).inserted {
        let found = locate(name, neededBy: path, file: object, programRPath: programRPath)
        result.append(Library(name: name, path: found?.path))
        if let found { queue.append(found) }
      }
    }
    return result
  }

  private func locate(_ name: String, neededBy object: String, file: ELFFile, programRPath: [String]) -> (
    path: String, file: ELFFile
  )? {
    if name.contains("/") { return candidate(name) }
    let origin = Self.directory(of: object)
    let runpath = (try? file.dynamicRunPath()) ?? []
    var directories: [String] = []
    if runpath.isEmpty { directories += ((try? file.dynamicRPath()) ?? []) + programRPath }
    directories += libraryPath + runpath + systemDirectories
    for directory in directories {
      let expanded = directory.replacingOrigin(with: origin)
      if let found = candidate(expanded + "/" + name) { return found }
    }
    return nil
  }

  /// A readable ELF64 x86-64 file at `path` (the loader skips incompatible ones too).
  private func candidate(_ path: String) -> (path: String, file: ELFFile)? {
    guard access(path, R_OK) == 0, let file = try? ELFFile(path: path) else { return nil }
    return (path, file)
  }

  static func directory(of path: String) -> String {
    guard let slash = path.lastIndex(of: "/") else { return "." }
    return slash == path.startIndex ? "/" : String(path[..<slash])
  }

  /// Directories listed in /etc/ld.so.conf and the files it includes (one level of globs in
  /// /etc/ld.so.conf.d, as Debian ships it).
  static func configuredDirectories() -> [String] {
    var directories: [String] = []
    var files = ["/etc/ld.so.conf"]
    if let directory = opendir("/etc/ld.so.conf.d") {
      var names: [String] = []
      while let entry = readdir(directory) {
        let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        if name.hasSuffix(".conf") { names.append("/etc/ld.so.conf.d/" + name) }
      }
      closedir(directory)
      files += names.sorted()
    }
    for file in files {
      guard let text = try? ELFFile.readFile(file) else { continue }
      for line in String(decoding: text, as: UTF8.self).split(separator: "\n") {
        let trimmed =
          line.split(separator: "#", maxSplits: 1, omittingEmptySubsequences: false)[0]
          .split(separator: " ").first.map(String.init) ?? ""
        if trimmed.hasPrefix("/") { directories.append(trimmed) }
      }
    }
    return directories
  }
}

extension ELFFile {
  func dynamicRPath() throws(ELFError) -> [String] {
    try dynamicPathList(tag: ELFConstants.DT_RPATH)
  }

  func dynamicRunPath() throws(ELFError) -> [String] {
    try dynamicPathList(tag: ELFConstants.DT_RUNPATH)
  }
}

extension String {
  fileprivate func replacingOrigin(with origin: String) -> String {
    var result = self
    for token in ["${ORIGIN}", "$ORIGIN"] {
      while let range = result.range(of: token) { result.replaceSubrange(range, with: origin) }
    }
    return result
  }

  fileprivate func range(of token: String) -> Range<String.Index>? {
    var index = startIndex
    while index < endIndex {
      if self[index...].hasPrefix(token) { return index..<self.index(index, offsetBy: token.count) }
      index = self.index(after: index)
    }
    return nil
  }
}
