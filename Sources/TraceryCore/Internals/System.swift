import CTraceryShims

#if canImport(Glibc)
  import Glibc
#endif

/// A failed system call: which one and its errno.
public struct SystemError: Error, Equatable, Sendable, CustomStringConvertible {
  public let call: String
  public let errno: Int32

  public var description: String { "\(call): \(String(cString: strerror(errno)))" }
}

/// Every system call TraceryCore makes goes through here (style R1): one wrapper per call,
/// EINTR retried in one place, errno turned into `SystemError`.
enum System {
  static let pageSize = UInt64(sysconf(Int32(_SC_PAGESIZE)))

  static func pageStart(_ address: UInt64) -> UInt64 { address & ~(pageSize - 1) }
  static func pageEnd(_ address: UInt64) -> UInt64 { (address + pageSize - 1) & ~(pageSize - 1) }

  static func mprotect(_ start: UInt64, _ length: UInt64, _ protection: Int32) throws(SystemError) {
    guard Glibc.mprotect(UnsafeMutableRawPointer(bitPattern: UInt(start)), Int(length), protection) == 0 else {
      throw SystemError(call: "mprotect", errno: errno)
    }
  }

  /// mmap(2); `fixedNoReplace` maps exactly at `hint` or fails with EEXIST.
  static func mmap(
    at hint: UInt64?, length: Int, protection: Int32, flags: Int32, fd: Int32 = -1, fixedNoReplace: Bool = false
  ) throws(SystemError) -> UInt64 {
    let extra = fixedNoReplace ? ctracery_MAP_FIXED_NOREPLACE : 0
    let result = Glibc.mmap(
      hint.flatMap { UnsafeMutableRawPointer(bitPattern: UInt($0)) }, length, protection, flags | extra, fd, 0)
    guard let result, result != MAP_FAILED else { throw SystemError(call: "mmap", errno: errno) }
    let address = UInt64(UInt(bitPattern: result))
    // Kernels before 4.17 treat MAP_FIXED_NOREPLACE as a plain hint: check we got the address.
    if fixedNoReplace, let hint, address != hint {
      Glibc.munmap(result, length)
      throw SystemError(call: "mmap", errno: EEXIST)
    }
    return address
  }

  static func munmap(_ address: UInt64, _ length: Int) {
    Glibc.munmap(UnsafeMutableRawPointer(bitPattern: UInt(address)), length)
  }

  static func memfd(name: String, size: Int) throws(SystemError) -> Int32 {
    let fd = ctracery_memfd_create(name)
    guard fd >= 0 else { throw SystemError(call: "memfd_create", errno: errno) }
    guard ftruncate(fd, off_t(size)) == 0 else {
      let saved = errno
      close(fd)
      throw SystemError(call: "ftruncate", errno: saved)
    }
    return fd
  }

  static func close(_ fd: Int32) { _ = Glibc.close(fd) }

  /// The monotonic clock, in nanoseconds. (Not `ContinuousClock`: it lives in Swift's
  /// concurrency library, which would bring that runtime and libdispatch into the agent, and
  /// their constructors into every traced process's start, ~0.1 ms.)
  static func monotonicNanoseconds() -> UInt64 {
    var now = timespec()
    clock_gettime(CLOCK_MONOTONIC, &now)
    return UInt64(now.tv_sec) * 1_000_000_000 + UInt64(now.tv_nsec)
  }

  /// The whole content of a (small, procfs) file, or nil.
  static func readFile(_ path: String) -> [UInt8]? {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return nil }
    defer { _ = Glibc.close(fd) }
    // procfs files report size 0: read into a growing buffer, never zeroed (a zeroed 32 KiB
    // buffer was a page fault per 4 KiB for a map a page long, three times per traced process).
    var result: [UInt8] = []
    var capacity = 32768
    var ended = false
    while !ended {
      result = [UInt8](unsafeUninitializedCapacity: capacity) { buffer, initialized in
        initialized = buffer.initialize(from: result).1
        while initialized < capacity {
          let got = read(fd, buffer.baseAddress! + initialized, capacity - initialized)
          if got < 0 && errno == EINTR { continue }
          if got <= 0 {
            ended = true
            break
          }
          initialized += got
        }
      }
      capacity *= 2
    }
    return result
  }

  /// The number of threads in this process (`Threads:` of /proc/self/status).
  static func threadCount() -> Int {
    statusField("Threads", of: "/proc/self/status").flatMap { Int($0) } ?? Int.max
  }

  /// The value of field `name` (`Name:\tvalue`) of a procfs status file, trimmed.
  static func statusField(_ name: String, of path: String) -> Substring? {
    guard let status = readFile(path) else { return nil }
    let prefix = name + ":"
    for line in String(decoding: status, as: UTF8.self).split(separator: "\n") where line.hasPrefix(prefix) {
      return line.dropFirst(prefix.count).trimmingCharacters(in: " \t")
    }
    return nil
  }

  /// Where the symbolic link at `path` points (one readlink, as the kernel's own links under
  /// /proc hold an absolute, resolved path: `realpath` would walk and readlink each component).
  static func linkTarget(_ path: String) -> String? {
    var buffer = [CChar](repeating: 0, count: 4097)
    let count = readlink(path, &buffer, 4096)
    guard count > 0 else { return nil }
    return String(decoding: buffer.prefix(count).map { UInt8(bitPattern: $0) }, as: UTF8.self)
  }

  static func resolvedPath(_ path: String) -> String {
    guard let resolved = realpath(path, nil) else { return path }
    defer { free(resolved) }
    return String(cString: resolved)
  }
}

extension Substring {
  func trimmingCharacters(in set: String) -> Substring {
    var result = self
    while let first = result.first, set.contains(first) { result = result.dropFirst() }
    while let last = result.last, set.contains(last) { result = result.dropLast() }
    return result
  }
}
