"""What runs before the real run: the smoke run and its projected hours, the GPU check at the real shapes. Imports
every package but predict."""
